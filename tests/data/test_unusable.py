"""A stream with nothing to train on ends within seconds with one line saying why, in `train`'s loader,
in the pre-spawn check and in `data inspect`: every record bad, every document longer than the
sequence, a huge stream of unusable records, the bad-sample limit hit before any batch exists.
The sequence-length bound of recipes is available to flags."""
import json
import os
import time

import pytest

from megatron_vita.cli import main
from megatron_vita.data.loader import build_train_loader, check_data
from megatron_vita.data.recipe import MIN_SEQ_LENGTH, check_seq_length, load_recipe
from megatron_vita.data.sampler import STALL_LIMIT, UnusableDataError

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "data_recipes", "demo.yaml")


def _recipe(tmp_path, lines, seq=64, bad="{max_fraction: 0.5, min_samples: 1000}"):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "r.yaml").write_text(f"name: u\nstage: 1\nseq_length: {seq}\nmodel: tiny\nbad_samples: {bad}\n"
                                     "datasets:\n  - {group: u, path: d.jsonl, ratio: 1.0}\n")
    return str(tmp_path / "r.yaml")


def _first_batch_error(recipe, root, demo_tok, tiny_cfg, cache_dir, **kw):
    loader = build_train_loader(recipe, tokenizer=demo_tok, model_config=tiny_cfg, data_root=str(root),
                                cache_dir=cache_dir, **kw)
    t0 = time.monotonic()
    try:
        with pytest.raises(UnusableDataError) as e:
            next(loader)
    finally:
        loader.close()
    assert time.monotonic() - t0 < 20 and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.timeout(60)
def test_all_records_bad(tmp_path, demo_tok, tiny_cfg, cache_dir):
    recipe = _recipe(tmp_path, [f"not json {i}" for i in range(40)])
    msg = _first_batch_error(recipe, tmp_path, demo_tok, tiny_cfg, cache_dir, num_workers=1)
    assert msg.startswith("no usable record in all 40 records of the recipe's selection: 40 bad (malformed_json 40)")
    assert "d.jsonl:" in msg and "malformed JSON: Expecting value: column 1" in msg
    with pytest.raises(UnusableDataError, match="no usable record"):  # before any rank is spawned
        check_data(load_recipe(recipe, str(tmp_path)), tokenizer=demo_tok, model_config=tiny_cfg,
                   data_root=str(tmp_path), cache_dir=cache_dir)


@pytest.mark.timeout(60)
def test_bad_limit_holds_before_any_batch(tmp_path, demo_tok, tiny_cfg, cache_dir):
    recipe = _recipe(tmp_path, [f"not json {i}" for i in range(400)], bad="{max_fraction: 0.5, min_samples: 25}")
    msg = _first_batch_error(recipe, tmp_path, demo_tok, tiny_cfg, cache_dir, num_workers=0)
    assert msg.startswith("no usable record in the first 25 records of the stream: 25 bad (malformed_json 25); "
                          "bad_samples.max_fraction 50.00% exceeded")


def _media_only_demo(demo_dir, tmp_path):
    """The demo recipe without its text file (a few of its exchanges fit in 16 tokens)."""
    text = open(DEMO).read().replace('  - {group: "demo-text", path: "train/text.jsonl", ratio: 1.0}\n', "")
    assert "text.jsonl" not in text
    (tmp_path / "media.yaml").write_text(text)
    return str(tmp_path / "media.yaml")


@pytest.mark.timeout(60)
def test_every_document_longer_than_the_sequence(demo_dir, demo_tok, tiny_cfg, cache_dir, tmp_path):
    recipe = load_recipe(_media_only_demo(demo_dir, tmp_path), demo_dir)
    recipe.seq_length = MIN_SEQ_LENGTH  # what a --seq-length flag does to the recipe
    msg = _first_batch_error(recipe, demo_dir, demo_tok, tiny_cfg, cache_dir, num_workers=0)
    n = sum(1 for d in recipe.datasets for _ in open(os.path.join(demo_dir, d.path)))
    assert msg.startswith(f"every document is longer than the sequence length 16 (all {n} records of the "
                          "recipe's selection); first: ")
    assert "oversize: longer than seq_length 16" in msg


@pytest.mark.timeout(120)
def test_huge_unusable_stream_stops_after_the_stall_limit(tmp_path, demo_tok, tiny_cfg, cache_dir):
    long_text = json.dumps({"messages": [{"role": "user", "content": "colour " * 20},
                                         {"role": "assistant", "content": "red"}]})
    recipe = _recipe(tmp_path, [long_text] * (STALL_LIMIT + 500), seq=16)
    msg = _first_batch_error(recipe, tmp_path, demo_tok, tiny_cfg, cache_dir, num_workers=0)
    assert msg.startswith(f"every document is longer than the sequence length 16 ({STALL_LIMIT} consecutive "
                          "records of the stream)")


def test_seq_length_bound_for_flags(tmp_path):
    assert check_seq_length(MIN_SEQ_LENGTH) == 16
    for bad in (8, 0, -4, 16.0, True):
        with pytest.raises(ValueError, match=r"^--seq-length: expected an integer >= 16 tokens, got "):
            check_seq_length(bad)
    with pytest.raises(ValueError, match=r"r.yaml:3: seq_length: expected >= 16 tokens, got 8"):
        load_recipe(_recipe(tmp_path, ["{}"], seq=8))


@pytest.mark.timeout(60)
def test_inspect_ends_with_one_line(tmp_path, demo_dir, capsys, cache_dir):
    recipe = _recipe(tmp_path, [f"not json {i}" for i in range(40)])
    assert main(["data", "inspect", "--recipe", recipe, "--data-root", str(tmp_path), "--tokenizer",
                 os.path.join(demo_dir, "tokenizer"), "--cache-dir", cache_dir, "--samples", "10"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-vita data: error: no usable record in all 40 records")
    short = tmp_path / "short.yaml"
    short.write_text(open(_media_only_demo(demo_dir, tmp_path)).read().replace("seq_length: 256", "seq_length: 16"))
    assert main(["data", "inspect", "--recipe", str(short), "--data-root", demo_dir, "--cache-dir", cache_dir,
                 "--samples", "10", "--packs", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: every document is longer than the sequence length 16" in err[0]
