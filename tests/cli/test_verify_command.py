"""`megatron-vita verify` end to end, as a user runs it: a real PNG and a real MP4, TP=2 PP=2."""
import os
import re
import subprocess
import sys

import pytest

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
