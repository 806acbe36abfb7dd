"""`python -m megatron_vita` refuses an unusable backend with one clear line (exit 2, no traceback)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vita.platform import ENV_VAR

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None,
                                reason="torch_npu is installed here, so --backend npu may work")


# Each start of the CLI costs seconds of imports: all cases start together, then are checked one by one.
CASES = {
    "flag": (["--backend", "npu", "verify", "--hf", "x"], None),
    "flag_after_command": (["verify", "--backend", "npu", "--hf", "x"], None),
    "env": (["verify", "--hf", "x"], "npu"),
    "cuda": (["--backend", "cuda", "verify", "--hf", "x"], None),
}


@pytest.fixture(scope="module")
def cli_runs():
    procs = {}
    for name, (argv, env_backend) in CASES.items():
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        if env_backend is not None:
            env[ENV_VAR] = env_backend
        procs[name] = subprocess.Popen([sys.executable, "-m", "megatron_vita", *argv], cwd=REPO, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def assert_one_line_refusal(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("megatron-vita: error: backend '")
    for needle in needles:
        assert needle in lines[0]


def test_backend_flag_npu_without_torch_npu(cli_runs):
    assert_one_line_refusal(cli_runs["flag"], "torch_npu", "(from --backend)")


def test_backend_flag_after_the_command(cli_runs):
    assert_one_line_refusal(cli_runs["flag_after_command"], "torch_npu")


def test_environment_npu_without_torch_npu(cli_runs):
    assert_one_line_refusal(cli_runs["env"], "torch_npu", f"(from {ENV_VAR})")


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch build")
def test_backend_flag_cuda_on_cpu_only_torch(cli_runs):
    assert_one_line_refusal(cli_runs["cuda"], "CPU-only build")


@pytest.mark.parametrize("argv", [
    ["--backend", "cpu", "data", "inspect", "--recipe", "missing.yaml"],
    ["data", "--backend", "cpu", "inspect", "--recipe", "missing.yaml"],
    ["data", "inspect", "--backend", "cpu", "--recipe", "missing.yaml"],
    ["data", "inspect", "--recipe", "missing.yaml", "--backend", "cpu"],
])
def test_backend_flag_anywhere_in_a_nested_command(argv, monkeypatch, capsys):
    """README: every command takes --backend; after a subcommand (`data inspect`) too. Parsing then
    succeeds and the command itself runs (here: refusing the missing recipe in one line)."""
    from megatron_vita.cli import main

    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() records the backend for child processes
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == "megatron-vita data: error: recipe missing.yaml not found", err
    assert os.environ[ENV_VAR] == "cpu"
