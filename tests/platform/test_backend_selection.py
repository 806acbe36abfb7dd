"""resolve_backend: explicit request > $MEGATRON_VITA_BACKEND > auto, and its error messages.

resolve_backend has no side effects (activate() does), so these run in the pytest process.
"""
import importlib.util

import pytest
import torch

from megatron_vita.platform import ENV_VAR, BackendUnavailableError, resolve_backend

NO_TORCH_NPU = importlib.util.find_spec("torch_npu") is None
CPU_ONLY_TORCH = torch.version.cuda is None
needs_no_torch_npu = pytest.mark.skipif(not NO_TORCH_NPU, reason="torch_npu is installed here")
needs_cpu_only_torch = pytest.mark.skipif(not CPU_ONLY_TORCH, reason="needs a CPU-only torch build")


@pytest.fixture(autouse=True)
def no_backend_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@needs_no_torch_npu
@needs_cpu_only_torch
def test_auto_is_cpu_on_a_cpu_only_machine(monkeypatch):
    assert resolve_backend() == "cpu"
    assert resolve_backend("auto") == "cpu"
    monkeypatch.setenv(ENV_VAR, "")  # empty means unset
    assert resolve_backend() == "cpu"


@needs_no_torch_npu
def test_environment_beats_auto(monkeypatch):
    # auto would give cpu; the environment's npu is honoured (and fails here, saying where it came from).
    monkeypatch.setenv(ENV_VAR, "npu")
    with pytest.raises(BackendUnavailableError) as e:
        resolve_backend()
    assert f"(from {ENV_VAR})" in str(e.value) and "torch_npu" in str(e.value)
    monkeypatch.setenv(ENV_VAR, "CPU")
    assert resolve_backend() == "cpu"


@needs_no_torch_npu
def test_explicit_request_beats_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "npu")
    assert resolve_backend("cpu") == "cpu"
    assert resolve_backend("auto") != "npu"
    monkeypatch.setenv(ENV_VAR, "cpu")
    with pytest.raises(BackendUnavailableError, match=r"\(from --backend\)"):
        resolve_backend("npu")


@pytest.mark.parametrize("source", ["--backend", ENV_VAR])
def test_invalid_backend_name(monkeypatch, source):
    if source == ENV_VAR:
        monkeypatch.setenv(ENV_VAR, "tpu")
        call = lambda: resolve_backend()  # noqa: E731
    else:
        call = lambda: resolve_backend("tpu")  # noqa: E731
    with pytest.raises(BackendUnavailableError) as e:
        call()
    msg = str(e.value)
    assert f"{source}='tpu' is not a backend" in msg and "auto, cpu, cuda or npu" in msg


@needs_no_torch_npu
def test_npu_requested_without_torch_npu_names_it():
    with pytest.raises(BackendUnavailableError) as e:
        resolve_backend("npu")
    msg = str(e.value)
    assert "backend 'npu'" in msg and "torch_npu is not installed" in msg and "set_env.sh" in msg


@needs_cpu_only_torch
def test_cuda_requested_on_cpu_only_torch_says_so():
    with pytest.raises(BackendUnavailableError) as e:
        resolve_backend("cuda")
    assert f"this torch ({torch.__version__}) is a CPU-only build" in str(e.value)
