"""examples/{npu,gpu,cpu}/serve.sh as a user runs them. The cluster scripts run with `torchrun`
replaced by a script that prints its command line: the released layout (TP 8 x CP 4, 1M tokens)
and the kernel flags reach `megatron-vita serve`, whose own parser must accept every flag. (The
CPU script serves for real in test_serve_cli.py.)"""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_vita.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
FAKE_TORCHRUN = "#!/usr/bin/env bash\nprintf 'ARGV %s\\n' \"$*\"\n"


def _torchrun_argv(tmp_path, script, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("USE_", "HCCL_", "MAX_", "TP", "CP"))}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
    proc = subprocess.run(["bash", str(REPO / script)], env=base, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(next(line for line in proc.stdout.splitlines() if line.startswith("ARGV "))[5:])


@pytest.mark.parametrize("kind,backend", [("npu", "npu"), ("gpu", "cuda")])
def test_cluster_scripts_serve_the_released_layout(tmp_path, kind, backend):
    argv = _torchrun_argv(tmp_path, f"examples/{kind}/serve.sh", MODEL="/ckpt/long-vita-1m", MEDIA_ROOT="/data",
                          NNODES="1")
    command = argv[argv.index("-m") + 1:]
    assert command[:2] == ["megatron_vita", "serve"]
    args = build_parser("serve").parse_args(command[1:])
    assert (args.tp, args.cp, args.cp_algo, args.max_seq_len, args.max_frames) == (8, 4, "ring", 1 << 20, 4096)
    assert (args.backend, args.host, args.port, args.media_root, args.dtype) == \
        (backend, "0.0.0.0", 5001, "/data", "bf16")
    if kind == "npu":  # MindSpeed's kernels on, as the training scripts run them
        assert args.use_flash_attn and args.use_fused_rmsnorm and args.use_fused_swiglu
    assert argv[argv.index("--nproc_per_node") + 1] == ("16" if kind == "npu" else "8")


def test_cluster_script_needs_a_model():
    proc = subprocess.run(["bash", str(REPO / "examples/npu/serve.sh")], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "MODEL"})
    assert proc.returncode != 0 and "set MODEL" in proc.stderr
