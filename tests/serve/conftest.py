"""Fixtures of the server tests: the inference tests' tiny HF model and real PNG / MP4
(tests/inference/conftest.py, loaded from there rather than copied), one HFGenerator over the
tiny model for the whole session, the directory the server's request media go to, and a
--media-root (servers: serve_testlib.start_server)."""
import importlib.util
import os
import shutil
import tempfile

import pytest

_spec = importlib.util.spec_from_file_location(
    "inference_fixtures", os.path.join(os.path.dirname(__file__), os.pardir, "inference", "conftest.py"))
_inference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_inference)
tiny_model_dir = _inference.tiny_model_dir
media_dir = _inference.media_dir
png_path = _inference.png_path
mp4_path = _inference.mp4_path


@pytest.fixture(scope="session")
def generator(tiny_model_dir):
    from megatron_vita.inference.hf_generator import HFGenerator

    gen = HFGenerator(tiny_model_dir)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def serve_tmp(tmp_path_factory):
    """Where the server writes its per-request media: the tests check it is left empty."""
    path = str(tmp_path_factory.mktemp("serve_tmp"))
    old, tempfile.tempdir = tempfile.tempdir, path
    yield path
    tempfile.tempdir = old


@pytest.fixture(scope="module")
def media_root(tmp_path_factory, png_path, mp4_path):
    """--media-root holding the PNG and MP4, plus a symlink that leads out of it."""
    root = tmp_path_factory.mktemp("media_root")
    shutil.copy(png_path, root / "square.png")
    shutil.copy(mp4_path, root / "bar.mp4")
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    shutil.copy(png_path, outside)
    os.symlink(outside, root / "escape.png")
    return str(root)
