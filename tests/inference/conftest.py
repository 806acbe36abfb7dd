"""Shared fixtures of the inference tests (HF generator, infer CLI, engine, serve, eval).

- `tiny_model_dir`: a tiny random Long-VITA in the released HF layout (`create_tiny`, what
  `megatron-vita create-tiny` writes) WITH a tokenizer whose 20 special tokens sit at the ids the
  tiny config expects (the demo's byte-level BPE, trained here on a few sentences), so that
  `megatron-vita infer --model_path DIR` works on it as on a released checkpoint.
- `png_path` / `mp4_path`: a real PNG (150x90: thumbnail + a 3x2 grid of 56px tiles) and a real
  H.264 MP4 (12 frames at 4 fps: 3 frames sampled at 1 fps), written with tests/mv_testlib.py.
Session-scoped and read-only: do not modify them.
"""
import os

import pytest

import megatron_vita  # noqa: F401  (registers the Long-VITA HF classes)

CORPUS = [
    "You are a helpful assistant.", "What colour is the shape?", "Describe the video.", "What is in the picture?",
    "The shape is red and it moves to the left.", "Hello, how are you today?", "user", "assistant", "system", "\n",
    "Answer with the option's letter from the given choices directly.", "A. red B. green C. blue D. yellow",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from megatron_vita.data.demo import train_tokenizer
    from megatron_vita.hf.tiny import create_tiny

    out = str(tmp_path_factory.mktemp("tiny_infer_model"))
    create_tiny(out, preset="tiny", seed=0)
    train_tokenizer(CORPUS * 4, out)
    return out


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("infer_media"))


@pytest.fixture(scope="session")
def png_path(media_dir):
    from mv_testlib import write_png

    path = os.path.join(media_dir, "square.png")
    write_png(path)
    return path


@pytest.fixture(scope="session")
def mp4_path(media_dir):
    from mv_testlib import write_mp4

    path = os.path.join(media_dir, "bar.mp4")
    write_mp4(path, frames=12, fps=4)
    return path
