"""`megatron-vita data make-demo` (deterministic, held-out split unseen and scored against chance) and
`megatron-vita data inspect` on the demo data (summary printed, PNG of the sample's tiles written, each
captioned with what it is)."""
import hashlib
import json
import os

import pytest
from PIL import Image

from megatron_vita.cli import main

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "data_recipes", "demo.yaml")


def _digests(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def test_make_demo_is_deterministic_and_heldout_is_unseen(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["data", "make-demo", a, "--scale", "0.05", "--seed", "3"]) == 0
    assert "demo dataset written" in capsys.readouterr().out
    assert main(["data", "make-demo", b, "--scale", "0.05", "--seed", "3"]) == 0
    da, db = _digests(a), _digests(b)
    assert da == db and any(k.endswith(".mp4") for k in da) and any(k.endswith(".jpg") for k in da)
    assert main(["data", "make-demo", a, "--scale", "0.05"]) == 1  # refuses to overwrite silently
    train_media = {v for k, v in da.items() if k.startswith("train/") and not k.endswith(".jsonl")}
    held_media = {v for k, v in da.items() if k.startswith("heldout/") and not k.endswith((".jsonl", ".json"))}
    assert held_media and not (train_media & held_media)
    meta = json.load(open(os.path.join(a, "heldout", "meta.json")))
    assert meta["question_types"]["colour"]["chance"] == pytest.approx(1 / 6)
    assert set(meta["question_types"]) == {"colour", "shape", "motion"}
    for q in meta["question_types"].values():
        assert all(len(ids) == 1 for ids in q["answer_token_ids"]) and len(set(map(tuple, q["answer_token_ids"]))) == len(q["answers"])
    for line in open(os.path.join(a, "heldout", "heldout.jsonl")):
        r = json.loads(line)
        assert r["answer"] in meta["question_types"][r["qtype"]]["answers"]
        assert r["messages"][-1]["content"] == r["answer"]


def test_inspect_demo_prints_summary_and_writes_png(demo_dir, tmp_path, capsys, cache_dir):
    png = str(tmp_path / "tiles.png")
    assert main(["data", "inspect", "--recipe", RECIPE, "--data-root", demo_dir, "--png", png,
                 "--samples", "60", "--packs", "5", "--cache-dir", cache_dir]) == 0
    out = capsys.readouterr().out
    for needle in ("recipe demo", "train/image_colour.jsonl", "token lengths of the first 60 documents",
                   "packing efficiency over 5 sequences", "_CONTEXT>x4</", "<|im_start|>assistant", "wrote"):
        assert needle in out, needle
    assert "<VID_CONTEXT><VID_CONTEXT>" not in out and "<IMG_CONTEXT><IMG_CONTEXT>" not in out
    with Image.open(png) as im:
        assert im.size[0] >= 56 and im.size[1] >= 56


def test_inspect_without_tokenizer_reports_sizes(tmp_path, capsys):
    assert main(["data", "inspect", "--recipe", RECIPE, "--data-root", str(tmp_path)]) == 1
    assert "file not found" in capsys.readouterr().err


def test_inspect_png_captions_say_what_each_tile_is():
    """The captions are read from the token layout the template writes: a 2x3-grid image (thumbnail
    + 6 tiles), a one-tile image and a 3-frame video, in token-block order."""
    from megatron_vita.config import TokenIds
    from megatron_vita.data.cli import tile_labels
    from megatron_vita.data.template import image_token_ids, video_token_ids

    tok, t = TokenIds(), 4
    ids = ([1, 2] + image_token_ids(7, (2, 3), tok, t, [198]) + [5] + image_token_ids(1, (1, 1), tok, t, [198])
           + video_token_ids(3, tok, t) + [9])
    assert tile_labels(ids, tok, t) == (["image 1 thumbnail"] + [f"image 1 tile {k}" for k in range(1, 7)]
                                        + ["image 2", "frame 1", "frame 2", "frame 3"])
