"""`convert --verify` and `verify --megatron` end to end, as a user runs them (megatron on gloo ranks)."""
import os
import re
import subprocess
import sys

from ckpttest_lib import layout

from megatron_vita.checkpoint.convert import convert

LAST_LINE = re.compile(r"^verify: cosine=(?P<cos>[0-9.]+) max_abs=(?P<abs>[0-9.e+-]+) top1=(?P<top1>[0-9.]+)%$")


def _cli(*args, timeout=400):
    proc = subprocess.run([sys.executable, "-m", "megatron_vita", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    assert float(m["cos"]) >= 0.9999 and float(m["top1"]) == 100.0 and float(m["abs"]) < 1e-4
    return proc.stdout


def test_convert_megatron_te_tp2_pp2_to_hf_with_verify(tiny_hf_dir, tmp_path):
    """Reference: megatron-core at TP2 PP2 streaming a TE-named legacy checkpoint; candidate: transformers."""
    src = str(tmp_path / "te")
    convert(tiny_hf_dir, src, "hf", "megatron", layout=layout(2, 2), megatron_format="legacy", names="te", progress=False,
            log=lambda *a: None)
    out = _cli("convert", "--from", "megatron", "--to", "hf", "--input", src, "--output", str(tmp_path / "hf"),
               "--verify", "--no-progress")
    assert "megatron-core at TP2 PP2 on 4 ranks from Megatron" in out and "legacy (te names)" in out
    assert f"running HF transformers {tmp_path / 'hf'}" in out


def test_verify_hf_against_torch_dist_at_another_layout(tiny_hf_dir, tmp_path):
    """A TP1 torch_dist checkpoint run at TP2 PP2 through megatron's dist_checkpointing.load."""
    ckpt = str(tmp_path / "dist")
    convert(tiny_hf_dir, ckpt, "hf", "megatron", progress=False, log=lambda *a: None)
    out = _cli("verify", "--hf", tiny_hf_dir, "--megatron", ckpt, "--tp", "2", "--pp", "2")
    assert "TP2 PP2 on 4 ranks" in out and "(megatron dist_checkpointing.load)" in out
