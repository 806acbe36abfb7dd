"""Bad input never crashes or silently stops training: every kind is skipped, counted by reason and
reported with file and line; too many bad samples stop the run with a summary. Also the LLaVA
formats (JSON array and LLaVA-style JSONL records) read like Long-VITA records."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from datatest_media import make_counter_video
from megatron_vita.data.image import MediaError
from megatron_vita.data.loader import RecordEvaluator, build_train_loader
from megatron_vita.data.recipe import load_recipe

Q = "<image>\nWhat colour is the shape?"
V = "<video>\nWhere?"


def rec(user, answer="red", **media):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       **media})


LINES = [  # (expected outcome at planning, JSONL line)
    ("ok", rec(Q, images=["good.png"])),
    ("bad:malformed_json", '{"messages": [{"role": "user", "content": "hi"'),
    ("bad:missing_fields", json.dumps({"images": ["good.png"]})),
    ("bad:missing_fields", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})),
    ("bad:placeholder_mismatch", rec(Q + " <image>", images=["good.png"])),
    ("bad:path_escape", rec(Q, images=["../outside.png"])),
    ("bad:missing_file", rec(Q, images=["nope.png"])),
    ("bad:corrupt_image", rec(Q, images=["garbage.jpg"])),
    ("ok", rec(Q, images=["truncated.jpg"])),  # header fine: fails when decoded (in a worker)
    ("bad:enormous_image", rec(Q, images=["big.png"])),
    ("bad:zero_frame_video", rec("<video>\nWhere?", "left", videos=["empty.mp4"])),
    ("bad:corrupt_video", rec("<video>\nWhere?", "left", videos=["junk.mp4"])),
    ("bad:reserved_token_in_text", rec("<IMG_CONTEXT> sneaky")),
    ("oversize", rec("colour " * 200)),
    ("ok", rec("<video>\nWhere?", "left", videos=["count.mp4"])),
    ("ok", json.dumps({"image": "good.png", "conversations": [{"from": "human", "value": Q},
                                                               {"from": "gpt", "value": "red"}]})),
    ("ok", rec("Say hello.", "hello")),
    ("bad:path_escape", rec(Q, images=["link.png"])),  # a symlink inside the root to ../outside.png
    ("bad:path_escape", rec(V, "left", videos=["linkframes"])),  # a frame directory with such a frame
    ("bad:enormous_image", rec(V, "left", videos=["bigframes"])),  # one frame over image.max_pixels
    ("ok", rec(Q, images=["truncated.png"])),  # header fine: fails when decoded (in a worker)
    ("bad:malformed_json", '{"messages": "unterminated'),
]


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    top = tmp_path_factory.mktemp("bad")
    root = top / "root"
    root.mkdir()
    Image.fromarray(np.full((56, 56, 3), (200, 30, 30), np.uint8)).save(root / "good.png")
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(top / "outside.png")  # exists, but escapes the root
    (root / "garbage.jpg").write_bytes(b"GIF89a garbage")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    os.symlink(top / "outside.png", root / "link.png")
    for name in ("linkframes", "bigframes"):
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    os.remove(root / "linkframes" / "1.png")
    os.symlink(top / "outside.png", root / "linkframes" / "1.png")
    Image.fromarray(np.zeros((120, 100, 3), np.uint8)).save(root / "bigframes" / "2.png")  # 12000 > 10000 pixels
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(root / "big.png")
    (root / "empty.mp4").write_bytes(b"")
    # fixed junk: random bytes are now and then probed by ffmpeg as a zero-frame stream
    (root / "junk.mp4").write_bytes(b"this is not a video file\n" * 100)
    make_counter_video(str(root / "count.mp4"), 6, 2)
    (root / "data.jsonl").write_text("\n".join(line for _, line in LINES) + "\n\n")
    recipe = top / "bad.yaml"
    recipe.write_text(
        "name: bad\nstage: 1\nseq_length: 128\nmodel: tiny\nimage: {max_tiles: 1, max_pixels: 10000}\n"
        "video: {max_frames: 4}\nbad_samples: {max_fraction: 1.0, min_samples: 1, report_first: 3}\n"
        "datasets:\n  - {group: bad, path: data.jsonl, ratio: 1.0}\n")
    return str(root), str(recipe)


def test_each_kind_is_classified(bad_root, demo_tok, tiny_cfg, cache_dir):
    root, recipe_path = bad_root
    ev = RecordEvaluator(load_recipe(recipe_path, root), demo_tok, tiny_cfg, root, cache_dir)
    assert ev.sizes == [len(LINES)]  # the trailing blank line is not a record
    for k, (expected, _) in enumerate(LINES):
        ref, outcome, loc, msg = ev.evaluate(0, k)
        assert outcome == expected, (k, msg)
        assert loc.endswith(f"data.jsonl:{k + 1}")
    for k, name in ((8, "truncated.jpg"), (20, "truncated.png")):
        with pytest.raises(MediaError, match=name) as e:
            ev.materialize(ev.evaluate(0, k)[0])
        assert e.value.reason == "corrupt_image"
    assert "outside.png" in ev.evaluate(0, 17)[3] and "frame 1 of" in ev.evaluate(0, 18)[3]
    assert "frame 2 of" in ev.evaluate(0, 19)[3] and "100x120 > 10000 pixels" in ev.evaluate(0, 19)[3]
    assert ev.evaluate(0, 21)[3] == "malformed JSON: Unterminated string starting at: column 14"
    ids, labels, pix = ev.materialize(ev.evaluate(0, 14)[0])
    assert pix.shape == (3, 56, 56, 3)  # 6 frames at 2 fps -> frames 0, 2, 4
    llava, native = ev.materialize(ev.evaluate(0, 15)[0]), ev.materialize(ev.evaluate(0, 0)[0])
    assert llava[0] == native[0] and llava[1] == native[1] and np.array_equal(llava[2], native[2])


def test_training_counts_reports_and_continues(bad_root, demo_tok, tiny_cfg, cache_dir):
    root, recipe_path = bad_root
    loader = build_train_loader(recipe_path, tokenizer=demo_tok, model_config=tiny_cfg, data_root=root,
                                cache_dir=cache_dir, num_workers=1, seed=3)
    try:
        trained = []
        for _ in range(14):
            batch = next(loader)
            assert batch["tokens"].shape == (1, 128) and "dropped" not in batch
            assert batch["num_samples"] == sum(len(row) for row in batch["samples"])
            trained += [tuple(x) for row in batch["samples"] for x in row]
        st = loader.stats()
        pending = sum(len(refs) for _, refs in loader.state_dict()["planner"]["packer"]["buffers"])
    finally:
        loader.close()
    from megatron_vita.data.sample import DataStats

    planner, combined = DataStats(), DataStats()
    planner.load_state_dict(st["planner"])
    combined.load_state_dict(st["combined"])
    reasons = combined.bad_by_reason()
    for outcome, _ in LINES:
        if outcome.startswith("bad:"):
            assert reasons.get(outcome[4:], 0) >= 1, outcome
    assert planner.total("oversize") >= 1 and "oversize" not in reasons
    assert len(planner.reports) == 3 and all("data.jsonl:" in r for r in planner.reports)
    # The truncated JPEG and PNG (lines 9 and 21) pass planning and fail in the worker: counted as
    # bad in the same statistics, in the summary, and never among the trained samples.
    decode = DataStats()
    decode.load_state_dict(st["decode"])
    late = decode.total("decode_failed")
    assert decode.bad_by_reason() == {"corrupt_image": late} and late >= 2
    assert {r.split(": ")[0].rsplit(":", 1)[1] for r in decode.reports} == {"9", "21"}
    assert reasons["corrupt_image"] == planner.bad_by_reason().get("corrupt_image", 0) + late
    assert combined.used() == planner.total("used") - late == len(trained) + pending  # pending: in packer buffers
    assert (0, 8) not in trained and (0, 20) not in trained and (0, 0) in trained
    assert "found when decoding" in st["summary"] and f"corrupt_image {reasons['corrupt_image']}" in st["summary"]


def test_too_many_bad_samples_stop_with_a_summary(bad_root, demo_tok, tiny_cfg, cache_dir, tmp_path):
    root, recipe_path = bad_root
    strict = tmp_path / "strict.yaml"
    strict.write_text(open(recipe_path).read().replace("max_fraction: 1.0, min_samples: 1",
                                                       "max_fraction: 0.2, min_samples: 5"))
    loader = build_train_loader(str(strict), tokenizer=demo_tok, model_config=tiny_cfg, data_root=root,
                                cache_dir=cache_dir, num_workers=0)
    with pytest.raises(RuntimeError, match="exceeds bad_samples.max_fraction") as e:
        for _ in range(10):
            next(loader)
    loader.close()
    assert "bad by reason" in str(e.value) and "data.jsonl:" in str(e.value)


def test_llava_json_array_file(tmp_path, demo_tok, tiny_cfg, cache_dir):
    Image.fromarray(np.full((56, 56, 3), 90, np.uint8)).save(tmp_path / "a.png")
    data = [{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                           {"from": "gpt", "value": "grey"}]},
            {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(data, indent=2))
    (tmp_path / "r.yaml").write_text("name: l\nstage: 2\nseq_length: 64\nmodel: tiny\nimage: {max_tiles: 1}\n"
                                     "datasets:\n  - {group: llava, path: llava.json, ratio: 1.0}\n")
    ev = RecordEvaluator(load_recipe(str(tmp_path / "r.yaml"), str(tmp_path)), demo_tok, tiny_cfg, str(tmp_path),
                         cache_dir)
    assert ev.files[0].format == "llava_json" and ev.sizes == [2]
    ids, labels, pix = ev.materialize(ev.evaluate(0, 0)[0])
    assert pix.shape == (1, 56, 56, 3) and ev.location(0, 1).endswith("llava.json record 2")
    assert demo_tok.decode([x for x in labels if x != -100]) == "grey<|im_end|>\n"
