"""examples/{npu,gpu}/infer.sh as a user runs them, with `torchrun` replaced by a script that
prints its command line: TP 8 x CP 4 at 1M tokens as released, the world split over nodes, and a
command line that the real `megatron-vita infer` parser accepts (flags, kernel flags, media)."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_TORCHRUN = """#!/usr/bin/env bash
printf 'ARGV'; printf ' %q' "$@"; echo
printf 'ENV %s\\n' "$HCCL_CONNECT_TIMEOUT"
"""


def _argv(tmp_path, script, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("USE_", "HCCL_", "NNODES", "NPROC"))}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
    proc = subprocess.run(["bash", str(REPO / script)], env=base, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return shlex.split(next(l for l in lines if l.startswith("ARGV "))[5:]), lines


@pytest.mark.parametrize("device,nodes", [("npu", "2"), ("gpu", "4")])
def test_infer_scripts_launch_the_released_layout(tmp_path, device, nodes):
    from megatron_vita.cli import build_parser

    argv, lines = _argv(tmp_path, f"examples/{device}/infer.sh", MODEL="/ckpt/lv-1m", QUESTION="What happens?",
                        VIDEO="/data/v.mp4", PREFILL_CHUNK="65536")
    assert argv[argv.index("--nnodes") + 1] == nodes
    assert argv[argv.index("-m") + 1] == "megatron_vita"
    args = build_parser("infer").parse_args(argv[argv.index("-m") + 2:])
    assert (args.command, args.tp, args.cp, args.cp_algo, args.max_seq_len, args.max_num_frame) == \
        ("infer", 8, 4, "ring", 1048576, 4096)
    assert (args.model_path, args.video_path, args.prefill_chunk, args.dtype) == ("/ckpt/lv-1m", ["/data/v.mp4"], 65536,
                                                                                  "bf16")
    assert args.backend == ("npu" if device == "npu" else "cuda")
    if device == "npu":
        assert args.use_flash_attn and "ENV 1800" in lines  # MindSpeed kernels on, HCCL settings from env.sh


def test_infer_script_needs_model_and_question():
    proc = subprocess.run(["bash", str(REPO / "examples/npu/infer.sh")], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k not in ("MODEL", "QUESTION")})
    assert proc.returncode != 0 and "MODEL" in proc.stderr
