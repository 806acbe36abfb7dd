"""Oversize documents: dropped and counted, truncated at a tile boundary (labels after the cut removed),
or -- the stage-4 policy -- videos resampled with fewer frames so that the document fits."""
import json

import pytest

from datatest_media import frame_number, make_counter_video
from megatron_vita.data.loader import RecordEvaluator
from megatron_vita.data.recipe import load_recipe
from megatron_vita.data.template import IGNORE_INDEX
from megatron_vita.data.video import sample_frame_indices

TWO_TURNS = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "<video>\nWhere?"}, {"role": "assistant", "content": "left"}],
             "videos": ["count.mp4"]}


@pytest.fixture()
def root(tmp_path):
    make_counter_video(str(tmp_path / "count.mp4"), 30, 10)
    video_only = {"messages": TWO_TURNS["messages"][2:], "videos": ["count.mp4"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(TWO_TURNS) + "\n" + json.dumps(video_only) + "\n")
    return tmp_path


def evaluator(root, policy, seq, demo_tok, tiny_cfg, cache_dir):
    (root / "r.yaml").write_text(
        f"name: o\nstage: 4\nseq_length: {seq}\nmodel: tiny\nvideo: {{max_frames: 8, max_fps: 5.0}}\n"
        f"packing: {{mode: shared, reset: false, oversize: {policy}}}\n"
        "datasets:\n  - {group: o, path: d.jsonl, ratio: 1.0}\n")
    return RecordEvaluator(load_recipe(str(root / "r.yaml"), str(root)), demo_tok, tiny_cfg, str(root), cache_dir)


def test_fits_unchanged_and_drop(root, demo_tok, tiny_cfg, cache_dir):
    full = evaluator(root, "drop", 512, demo_tok, tiny_cfg, cache_dir).evaluate(0, 0)
    assert full[1] == "ok"
    n = full[0][2]
    assert n > 8 * 6  # 8 frames x (<vid> + 4 + </vid>)
    ref, outcome, _, _ = evaluator(root, "drop", n - 1, demo_tok, tiny_cfg, cache_dir).evaluate(0, 0)
    assert ref is None and outcome == "oversize"


def test_fewer_frames_resamples_the_video_to_fit(root, demo_tok, tiny_cfg, cache_dir):
    n = evaluator(root, "drop", 512, demo_tok, tiny_cfg, cache_dir).evaluate(0, 0)[0][2]
    seq = n - 3 * 6  # room for 5 of the 8 frames
    ev = evaluator(root, "fewer_frames", seq, demo_tok, tiny_cfg, cache_dir)
    ref, outcome, _, _ = ev.evaluate(0, 0)
    assert outcome == "fewer_frames" and ref[2] == n - 18 and ref[3] == 5
    ids, labels, pix = ev.materialize(ref)
    expected = sample_frame_indices(30, 10.0, 5, 5.0)
    assert expected == [0, 5, 10, 15, 20] and [frame_number(p) for p in pix] == expected
    assert labels.count(IGNORE_INDEX) < len(labels)
    tiny = evaluator(root, "fewer_frames", n - 8 * 6 + 5, demo_tok, tiny_cfg, cache_dir)  # not even one frame
    assert tiny.evaluate(0, 0)[1] == "oversize"


def test_truncate_cuts_before_a_split_tile_block(root, demo_tok, tiny_cfg, cache_dir):
    full_ids = evaluator(root, "drop", 512, demo_tok, tiny_cfg, cache_dir).materialize(
        evaluator(root, "drop", 512, demo_tok, tiny_cfg, cache_dir).evaluate(0, 0)[0])[0]
    vid = demo_tok.convert_tokens_to_ids("<vid>")
    first_vid = full_ids.index(vid)
    seq = first_vid + 6 * 2 + 3  # inside the third frame block
    ev = evaluator(root, "truncate", seq, demo_tok, tiny_cfg, cache_dir)
    ref, outcome, _, _ = ev.evaluate(0, 0)
    assert outcome == "truncated" and ref[2] == first_vid + 12
    ids, labels, pix = ev.materialize(ref)
    assert ids == full_ids[:first_vid + 12] and len(pix) == 2
    assert demo_tok.decode([x for x in labels if x != IGNORE_INDEX]) == "hello<|im_end|>\n"
    assert labels[-1] == IGNORE_INDEX
    nothing = evaluator(root, "truncate", 20, demo_tok, tiny_cfg, cache_dir)  # the cut leaves no answer
    assert nothing.evaluate(0, 1)[1] == "oversize"
