"""`megatron-vita verify` with MindSpeed's kernel flags: the patched megatron-core model (TP2 PP2)
against the unpatched HF reference, on the CPU against the tests' torch_npu EMULATION
(tests/emulation on PYTHONPATH; pure torch, nothing ran on an NPU); without the emulation each
flag is refused in one line before anything runs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vita.config.features import npu_feature_names

REPO = Path(__file__).resolve().parents[2]
EMULATION = str(REPO / "tests" / "emulation")
LAST_LINE = re.compile(r"^verify: cosine=(?P<cos>[0-9.]+) max_abs=(?P<abs>[0-9.e+-]+) top1=(?P<top1>[0-9.]+)%$")
# The target command of the issue, with whichever of its four flags mindspeed_patches has.
WANTED = ("use-flash-attn", "use-fused-rmsnorm", "use-fused-swiglu", "use-fused-rotary-pos-emb")
FLAGS = ["--" + n for n in WANTED if n in npu_feature_names()]
pytestmark = pytest.mark.skipif(not FLAGS, reason="no NPU feature in mindspeed_patches.FEATURES yet")


def _verify(*args, emulation: bool, timeout=600):
    env = {**os.environ, "MEGATRON_VITA_BACKEND": "cpu"}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != EMULATION]
    env["PYTHONPATH"] = os.pathsep.join(([EMULATION] if emulation else []) + paths)
    return subprocess.run([sys.executable, "-m", "megatron_vita", "verify", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.timeout(600)
def test_verify_patched_model_against_hf_with_the_emulation(tiny_hf_dir):
    proc = _verify("--hf", tiny_hf_dir, "--tp", "2", "--pp", "2", *FLAGS, emulation=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    assert float(m["cos"]) >= 0.9999 and float(m["top1"]) == 100.0 and float(m["abs"]) < 1e-4, lines[-1]
    # The candidate's ranks ran with the kernel flags; the reference is transformers, unpatched.
    done = next(line for line in lines if line.startswith("verify: candidate done"))
    kernels = re.search(r"kernels: ([-a-z, ]+)\)", done)
    assert kernels and sorted(kernels.group(1).split(", ")) == sorted(FLAGS), done
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(120)
def test_verify_refuses_a_kernel_flag_without_the_emulation(tiny_hf_dir):
    proc = _verify("--hf", tiny_hf_dir, "--tp", "2", FLAGS[0], emulation=False, timeout=100)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"megatron-vita verify: error: {FLAGS[0]}: an NPU kernel") and "emulation" in line, line
    assert "reference done" not in proc.stdout  # refused before anything ran
