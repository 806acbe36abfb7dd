"""Stage recipes: all four load and validate against a data root of generated stand-in files and
match data_mixtures.tsv; errors name the recipe line (unknown key, missing file, impossible value)."""
import csv
import json
import os

import pytest

from megatron_vita.data.recipe import load_recipe, recipe_dir



def tsv_rows():
    """The released mixture table, kept beside the recipes."""
    with open(os.path.join(recipe_dir(), "data_mixtures.tsv")) as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def standin_root(tmp_path_factory):
    """Every dataset file of every stage recipe, each holding one valid Long-VITA record."""
    root = tmp_path_factory.mktemp("standin")
    line = json.dumps({"messages": [{"role": "user", "content": "Say hello."},
                                    {"role": "assistant", "content": "hello"}]}) + "\n"
    for stage in range(1, 5):
        for d in load_recipe(os.path.join(recipe_dir(), f"stage{stage}.yaml")).datasets:
            p = root / d.path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(line)
    return str(root)


@pytest.mark.parametrize("stage,seq,frames,mode,reset", [
    (1, 32768, 128, "per_source", True), (2, 16384, 128, "per_source", True),
    (3, 131072, 512, "shared", False), (4, 1048576, 4096, "shared", False)])
def test_stage_recipes_validate_against_standin_files(standin_root, stage, seq, frames, mode, reset, demo_tok,
                                                      cache_dir):
    from megatron_vita.config.model import ModelConfig
    from megatron_vita.data.loader import RecordEvaluator

    r = load_recipe(os.path.join(recipe_dir(), f"stage{stage}.yaml"), standin_root)
    assert (r.stage, r.seq_length, r.video.max_frames, r.packing.mode, r.packing.reset) == (stage, seq, frames, mode, reset)
    assert r.image.max_tiles == 12 and r.model == "long-vita-14b" and r.training["tensor-model-parallel-size"] == 8
    mine = [(d.group, d.path, d.ratio, d.cap) for d in r.datasets]
    ref = [(x["group"], x["jsonl_path"], float(x["ratio"]), int(x["num_cap"]) if x["num_cap"] else None)
           for x in tsv_rows() if int(x["stage"]) == stage]
    assert mine == ref
    assert len(r.datasets) == 197
    ev = RecordEvaluator(r, demo_tok, ModelConfig.from_name("long-vita-14b"), standin_root, cache_dir)
    first = next(i for i, d in enumerate(r.datasets) if d.enabled)
    ref_, outcome, loc, _ = ev.evaluate(first, 0)
    assert outcome == "ok" and ref_[2] > 5 and loc.endswith(":1")


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


GOOD = """name: t
stage: 2
seq_length: 1024
model: tiny
image:
  max_tiles: 6
training:
  anything: [goes, here]
  nested: {lr: 1.0e-5}
datasets:
  - {group: a, path: a.jsonl, ratio: 1.0}
  - {group: b, path: missing_but_off.jsonl, ratio: 0.0}
  - {group: c, path: c.jsonl, ratio: 0.5, cap: 10}
"""


def test_good_recipe_and_training_section_passes_through(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "c.jsonl").write_text("{}\n")
    r = load_recipe(_write(tmp_path, GOOD), str(tmp_path))
    assert r.training == {"anything": ["goes", "here"], "nested": {"lr": 1e-5}}
    assert [d.line for d in r.datasets] == [11, 12, 13] and [d.enabled for d in r.datasets] == [True, False, True]
    assert r.datasets[2].cap == 10 and r.image.max_tiles == 6 and r.image.min_tiles == 1


@pytest.mark.parametrize("old,new,where", [
    ("seq_length: 1024", "seq_lenght: 1024", ":3: seq_lenght: unknown key"),
    ("  max_tiles: 6", "  max_tile: 6", ":6: image.max_tile: unknown key"),
    ("ratio: 0.5, cap: 10}", "ratio: 0.5, cap: 10, weight: 2}", ":13: datasets[2].weight: unknown key"),
    ("seq_length: 1024", "seq_length: 0", ":3: seq_length: expected >= 16"),
    ("  max_tiles: 6", "  max_tiles: 0", ":6: image.max_tiles: need 1 <= min_tiles <= max_tiles"),
    ("ratio: 0.5, cap", "ratio: -0.5, cap", ":13: datasets[2].ratio: expected a ratio >= 0"),
    ("ratio: 0.5, cap", "ratio: lots, cap", ":13: datasets[2].ratio: expected a number"),
    ("seq_length: 1024", "seq_length: 1024\npacking: {mode: magic}", ":4: packing.mode: expected one of"),
    ("stage: 2", "stage: 7", ":2: stage: expected 1..4"),
    ("{group: c, path: c.jsonl", "{group: c, path: a.jsonl", ":13: datasets[2].path: a.jsonl is listed twice"),
    ("name: t\n", "", ":1: name: required key is missing"),
    ("model: tiny\n", "model: tiny\nstage: 3\n", ":5: invalid YAML: duplicate key 'stage'"),
])
def test_errors_name_the_recipe_line(tmp_path, old, new, where):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "c.jsonl").write_text("{}\n")
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ValueError) as e:
        load_recipe(path, str(tmp_path))
    assert where in str(e.value) and str(e.value).startswith(path)


def test_missing_file_names_its_line(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    path = _write(tmp_path, GOOD)
    with pytest.raises(ValueError, match=r":13: datasets\[2\].path: file not found: .*c.jsonl"):
        load_recipe(path, str(tmp_path))
    load_recipe(path)  # without a data root only the schema is checked
    with pytest.raises(ValueError, match=":2: invalid YAML"):
        load_recipe(_write(tmp_path, "name: x\n  bad: [indent\n", "y.yaml"))
