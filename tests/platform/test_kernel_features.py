"""Kernel feature flags (MindSpeed's names) against the backend: the gate, auto-detection with the
torch_npu EMULATION of the tests on the path, and `platform.spawn(..., features=)` carrying the
flags to every rank's `platform.activate`.

The emulation (tests/emulation/torch_npu, IS_EMULATION = True) is a pure-torch stand-in for the
torch_npu op contracts; nothing here runs on, or says anything about, an NPU.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vita.config.features import CUDA_FEATURES, known_feature_names, npu_feature_names
from megatron_vita.platform.features import feature_problems
from megatron_vita.config.parallel import ConfigError
from megatron_vita.platform import ENV_VAR, BackendUnavailableError, resolve_backend, spawn

REPO = Path(__file__).resolve().parents[2]
EMULATION = str(REPO / "tests" / "emulation")
NPU_FEATURES = npu_feature_names()
needs_npu_features = pytest.mark.skipif(not NPU_FEATURES, reason="mindspeed_patches.FEATURES is empty")


@pytest.fixture
def no_emulation(monkeypatch):
    """This process without any torch_npu (the emulation may be on sys.path from other tests)."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p) != EMULATION])
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    importlib.invalidate_caches()
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("a torch_npu is installed here")


@pytest.fixture
def emulation(monkeypatch):
    """The torch_npu EMULATION importable in this process and in the ranks it spawns."""
    monkeypatch.syspath_prepend(EMULATION)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    importlib.invalidate_caches()


def test_auto_detection_never_selects_the_emulation(emulation):
    """It imports (it is a module named torch_npu) but is no NPU: auto gives cpu, and an explicit
    npu names the emulation in one line (the old probe crashed on the missing torch.npu)."""
    assert importlib.import_module("torch_npu").IS_EMULATION is True
    assert resolve_backend() == "cpu"
    with pytest.raises(BackendUnavailableError) as e:
        resolve_backend("npu")
    assert "emulation" in str(e.value) and "IS_EMULATION" in str(e.value) and "\n" not in str(e.value)


@needs_npu_features
def test_npu_features_on_cpu_need_the_emulation(no_emulation):
    problems = feature_problems("cpu", NPU_FEATURES)
    assert len(problems) == len(NPU_FEATURES)
    for name, line in zip(NPU_FEATURES, problems):
        assert line.startswith(f"--{name}: an NPU kernel") and "emulation" in line and "\n" not in line


@needs_npu_features
def test_npu_features_on_cpu_with_the_emulation(emulation):
    assert feature_problems("cpu", NPU_FEATURES) == []
    assert feature_problems("npu", NPU_FEATURES) == []


def test_cuda_takes_only_flags_with_a_cuda_meaning():
    npu_only = [n for n in NPU_FEATURES if n not in CUDA_FEATURES]
    problems = feature_problems("cuda", npu_only + ["use-flash-attn"])
    for name, line in zip(npu_only, problems):
        assert line.startswith(f"--{name}: an NPU kernel") and "cuda" in line
    if importlib.util.find_spec("flash_attn") is None:
        assert problems[-1].startswith("--use-flash-attn on --backend cuda needs flash-attn")
        assert "flash_attn is not installed" in problems[-1]
    assert feature_problems("cuda", ["--no-such-kernel"]) == [
        "--no-such-kernel: not a kernel feature flag (known: "
        + ", ".join("--" + n for n in known_feature_names()) + ")"]


@needs_npu_features
def test_spawn_refuses_before_any_rank_starts(no_emulation):
    with pytest.raises(ConfigError) as e:
        spawn(_never_called, 2, backend="cpu", features=[NPU_FEATURES[0]], timeout=30)
    assert e.value.problems[0].startswith(f"--{NPU_FEATURES[0]}: an NPU kernel")


def _never_called(rank, world):
    raise AssertionError("a rank started although its features were refused")


def _features_of_rank(rank, world):
    import mindspeed_patches
    from megatron_vita import platform

    applied = sorted({e.target for e in mindspeed_patches.REGISTRY.entries() if e.applied})
    return {"features": platform.current().features, "enabled": mindspeed_patches.adaptor._ENABLED,
            "applied": applied}


@needs_npu_features
@pytest.mark.timeout(120)
def test_spawn_carries_the_features_to_every_rank(emulation):
    from megatron_vita.parallel.megatron_patches import PATCHES

    own_fixes = {p.target for p in PATCHES if "cpu" in p.backends}
    results = spawn(_features_of_rank, 2, backend="cpu", features=["--" + n for n in NPU_FEATURES], timeout=90)
    for r in results:
        assert r["features"] == tuple(NPU_FEATURES) and r["enabled"] == NPU_FEATURES
        # The features' patches are applied on top of megatron-vita's own fixes.
        assert own_fixes < set(r["applied"]), r


@pytest.mark.timeout(120)
def test_cli_backend_npu_with_the_emulation_is_one_line():
    env = {**{k: v for k, v in os.environ.items() if k != ENV_VAR}, "PYTHONPATH": EMULATION}
    proc = subprocess.run([sys.executable, "-m", "megatron_vita", "--backend", "npu", "verify", "--hf", "x"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("megatron-vita: error: backend 'npu'") and "emulation" in line, line
