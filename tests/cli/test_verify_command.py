"""`megatron-vita verify` end to end, as a user runs it: a real PNG and a real MP4, TP=2 PP=2;
bf16 thresholds that pass a correct conversion and fail a wrong one; broken checkpoints refused
in one line before any rank starts."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from mv_testlib import write_mp4, write_png

LAST_LINE = re.compile(r"^verify: cosine=(?P<cos>[0-9.]+) max_abs=(?P<abs>[0-9.e+-]+) top1=(?P<top1>[0-9.]+)%$")


def _verify(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "megatron_vita", "verify", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MEGATRON_VITA_BACKEND": "cpu"})


def test_verify_tp2_pp2_with_real_image_and_video(tiny_hf_dir, tmp_path):
    image, video = str(tmp_path / "img.png"), str(tmp_path / "clip.mp4")
    write_png(image)
    write_mp4(video)
    proc = _verify("--hf", tiny_hf_dir, "--tp", "2", "--pp", "2", "--image", image, "--video", video)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, f"last line is not the verify summary: {lines[-1]!r}"
    assert float(m["cos"]) >= 0.9999 and float(m["top1"]) == 100.0 and float(m["abs"]) < 1e-4
    # The real files were used: the image was tiled, the video decoded and sampled (<= 1 fps).
    assert any("tiles (grid" in line and image in line for line in lines)
    assert any(f"3 frames from {video}" in line for line in lines)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--image", "--video"])
def test_verify_names_a_missing_media_file(tiny_hf_dir, tmp_path, flag):
    missing = str(tmp_path / "nope.bin")
    proc = _verify("--hf", tiny_hf_dir, flag, missing, timeout=120)
    assert proc.returncode == 1
    assert f"{flag} {missing} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_verify_refuses_a_layout_the_model_cannot_take(tiny_hf_dir):
    proc = _verify("--hf", tiny_hf_dir, "--tp", "3", timeout=120)
    assert proc.returncode == 1
    assert "--tensor-model-parallel-size 3" in proc.stderr and "Traceback" not in proc.stderr


def _wrong_checkpoint(tiny_hf_dir, out):
    """The tiny checkpoint with k_proj and v_proj of the last LLM layer swapped (same shapes under
    GQA): the kind of mix-up a converter makes. Measured in bf16: cosine 0.757, top-1 38.7%."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(glob.glob(os.path.join(tiny_hf_dir, "*.safetensors"))):
        tensors.update(load_file(f))
    k, v = "model.layers.3.self_attn.k_proj.weight", "model.layers.3.self_attn.v_proj.weight"
    tensors[k], tensors[v] = tensors[v], tensors[k]
    os.makedirs(out)
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(tiny_hf_dir, name), out)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.timeout(600)
def test_verify_bf16_fails_a_wrong_checkpoint(tiny_hf_dir, tmp_path):
    from megatron_vita.checkpoint.convert import convert

    wrong = _wrong_checkpoint(tiny_hf_dir, str(tmp_path / "wrong_hf"))
    mg = str(tmp_path / "wrong_mg")
    convert(wrong, mg, "hf", "megatron", progress=False, log=lambda *a: None)
    proc = _verify("--hf", tiny_hf_dir, "--megatron", mg, "--dtype", "bf16")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m and float(m["cos"]) < 0.99, lines[-1]
    assert "verify: FAILED (bf16 needs cosine >= 0.995 and top-1 >= 85%)" in lines
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(600)
def test_verify_bf16_passes_a_correct_conversion(tiny_hf_dir):
    from megatron_vita.checkpoint.verify import verify

    logged = []
    summary = verify(tiny_hf_dir, dtype="bf16", backend="cpu", log=logged.append)
    assert summary["passed"], logged
    # Not trivially equal: bf16 rounding shows (measured max |diff| ~0.05-0.1, cosine ~0.9997).
    assert 0.995 <= summary["cosine"] < 1.0 and summary["max_abs"] > 1e-3, summary


class _Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_hf(tiny_hf_dir, tmp_path):
    src = tmp_path / "evil_hf"
    src.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir, "config.json"), src)
    marker = tmp_path / "payload_ran"
    torch.save({"model.norm.weight": torch.ones(4), "evil": _Payload(marker)}, src / "pytorch_model.bin")
    return ["--hf", str(src)], str(src / "pytorch_model.bin"), "refusing to load", marker


def _truncated_distcp(tiny_hf_dir, tmp_path):
    from megatron_vita.checkpoint.convert import convert

    mg = tmp_path / "dist"
    convert(tiny_hf_dir, str(mg), "hf", "megatron", progress=False, log=lambda *a: None)
    (data,) = glob.glob(str(mg / "iter_0000000" / "*.distcp"))
    os.truncate(data, os.path.getsize(data) // 2)
    return ["--hf", tiny_hf_dir, "--megatron", str(mg), "--tp", "2", "--pp", "2"], data, "is truncated", None


def _truncated_common(tiny_hf_dir, tmp_path):
    from megatron_vita.checkpoint.convert import convert

    mg = tmp_path / "dist"
    convert(tiny_hf_dir, str(mg), "hf", "megatron", progress=False, log=lambda *a: None)
    common = str(mg / "iter_0000000" / "common.pt")
    os.truncate(common, os.path.getsize(common) - 30)
    return ["--hf", tiny_hf_dir, "--megatron", str(mg)], common, "not a readable torch checkpoint", None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("make", [_malicious_hf, _truncated_distcp, _truncated_common],
                         ids=["malicious-bin", "truncated-distcp", "truncated-common"])
def test_verify_refuses_a_broken_checkpoint_in_one_line(make, tiny_hf_dir, tmp_path):
    args, file, why, marker = make(tiny_hf_dir, tmp_path)
    proc = _verify(*args, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert err[0].startswith("megatron-vita verify: error: ") and file in err[0] and why in err[0], err[0]
    assert "reference done" not in proc.stdout  # refused before anything ran
    assert marker is None or not marker.exists()
