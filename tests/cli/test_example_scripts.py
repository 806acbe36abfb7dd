"""examples/{npu,gpu}/stageN.sh as a user runs them, with `torchrun` replaced by a script that
prints its command line and environment: the NPU stages switch MindSpeed's four kernel flags on
(each off with its variable, e.g. USE_FLASH_ATTN=0), env.sh fills the HCCL / CANN defaults only
where the environment has none, and the GPU stages add --use-flash-attn only when flash_attn imports."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNELS = ["--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb"]
ENV_DEFAULTS = {"HCCL_CONNECT_TIMEOUT": "1800", "HCCL_EXEC_TIMEOUT": "1800", "HCCL_BUFFSIZE": "200",
                "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "TASK_QUEUE_ENABLE": "2",
                "CPU_AFFINITY_CONF": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
FAKE_TORCHRUN = """#!/usr/bin/env bash
printf 'ARGV %s\\n' "$*"
for name in {names}; do printf 'ENV %s=%s\\n' "$name" "${{!name}}"; done
"""


def _run(tmp_path, script, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    torchrun = bin_dir / "torchrun"
    torchrun.write_text(FAKE_TORCHRUN.format(names=" ".join(ENV_DEFAULTS)))
    torchrun.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ENV_DEFAULTS and not k.startswith("USE_")}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DATA_ROOT=str(tmp_path), TOKENIZER=str(tmp_path),
                OUTPUT_DIR=str(tmp_path / "out"), HF_INIT=str(tmp_path), **env)
    proc = subprocess.run(["bash", str(REPO / script)], env=base, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(next(line for line in proc.stdout.splitlines() if line.startswith("ARGV "))[5:])
    seen = dict(line[4:].split("=", 1) for line in proc.stdout.splitlines() if line.startswith("ENV "))
    return argv, seen


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_npu_stages_switch_the_kernels_on(tmp_path, stage):
    argv, env = _run(tmp_path, f"examples/npu/stage{stage}.sh")
    assert [a for a in argv if a in KERNELS] == KERNELS and argv[argv.index("--backend") + 1] == "npu"
    assert env == ENV_DEFAULTS


def test_each_kernel_can_be_turned_off_and_the_environment_wins(tmp_path):
    argv, env = _run(tmp_path, "examples/npu/stage1.sh", USE_FLASH_ATTN="0", USE_FUSED_SWIGLU="0",
                     HCCL_CONNECT_TIMEOUT="7200", TASK_QUEUE_ENABLE="1")
    assert [a for a in argv if a in KERNELS] == ["--use-fused-rmsnorm", "--use-fused-rotary-pos-emb"]
    assert env == {**ENV_DEFAULTS, "HCCL_CONNECT_TIMEOUT": "7200", "TASK_QUEUE_ENABLE": "1"}


def test_gpu_stage_adds_flash_attn_only_when_it_imports(tmp_path):
    fake = tmp_path / "site" / "flash_attn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")  # an importable flash_attn package (the script only imports it)
    argv, _ = _run(tmp_path, "examples/gpu/stage1.sh")
    assert argv[argv.index("--backend") + 1] == "cuda" and "--use-flash-attn" not in argv
    argv, _ = _run(tmp_path, "examples/gpu/stage1.sh", PYTHONPATH=str(tmp_path / "site"))
    assert [a for a in argv if a in KERNELS] == ["--use-flash-attn"]
    argv, _ = _run(tmp_path, "examples/gpu/stage1.sh", PYTHONPATH=str(tmp_path / "site"), USE_FLASH_ATTN="0")
    assert "--use-flash-attn" not in argv
