"""Media that pass planning (headers fine) but fail when decoded in a DataLoader worker: each drop comes
back with its batch, is counted by reason in the same statistics as the planner's, counts toward the
bad-sample limit, survives an exact resume, is gathered over data-parallel ranks, and `data inspect`
reports it instead of rendering (and aborting on) such a sample."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vita.cli import main
from megatron_vita.data.loader import build_train_loader
from megatron_vita.data.sample import DataStats

GOOD, BROKEN, TEXT = 12, 6, 2


def _rec(user, answer, **media):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       **media})


def _truncated(fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _write(root, good=GOOD, text=TEXT, fraction="1.0"):
    os.makedirs(root, exist_ok=True)
    lines = []
    for i in range(good):
        Image.fromarray(np.full((56, 56, 3), (20 * i, 100, 200), np.uint8)).save(os.path.join(root, f"g{i}.png"))
        lines.append(_rec("<image>\nColour?", f"c{i % 3}", images=[f"g{i}.png"]))
    for i in range(BROKEN):
        name = f"b{i}.jpg" if i % 2 else f"b{i}.png"
        with open(os.path.join(root, name), "wb") as f:
            f.write(_truncated("JPEG" if i % 2 else "PNG", i))
        lines.append(_rec("<image>\nColour?", "red", images=[name]))
    lines += [_rec("Say hello.", "hello")] * text
    with open(os.path.join(root, "d.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    recipe = os.path.join(root, "r.yaml")
    with open(recipe, "w") as f:
        f.write(f"name: drops\nstage: 1\nseq_length: 96\nmodel: tiny\nimage: {{max_tiles: 1}}\n"
                f"bad_samples: {{max_fraction: {fraction}, min_samples: 5}}\n"
                "datasets:\n  - {group: d, path: d.jsonl, ratio: 1.0}\n")
    return recipe


@pytest.fixture(scope="module")
def drops_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("drops"))
    return root, _write(root)


def _loader(recipe, root, tok, cfg, cache_dir, **kw):
    kw.setdefault("seed", 5)
    return build_train_loader(recipe, tokenizer=tok, model_config=cfg, data_root=root, cache_dir=cache_dir, **kw)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


def _counts(stats_part):
    d = DataStats()
    d.load_state_dict(stats_part)
    return {k: dict(v) for k, v in d.counts.items()}


@pytest.mark.timeout(120)
def test_exact_resume_keeps_batches_and_drop_counts(drops_root, demo_tok, tiny_cfg, cache_dir):
    root, recipe = drops_root
    k = 6
    full_loader = _loader(recipe, root, demo_tok, tiny_cfg, cache_dir, num_workers=0)
    full = _take(full_loader, 2 * k)
    full_stats = full_loader.stats()
    full_loader.close()
    first = _loader(recipe, root, demo_tok, tiny_cfg, cache_dir, num_workers=2)
    head = _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = _loader(recipe, root, demo_tok, tiny_cfg, cache_dir, num_workers=2, state=state)
    tail = _take(resumed, k)
    stats = resumed.stats()
    resumed.close()
    _same(head + tail, full)
    assert stats["summary"] == full_stats["summary"] and stats["combined"] == full_stats["combined"]
    late = DataStats()
    late.load_state_dict(stats["decode"])
    assert late.total("decode_failed") >= 2 and set(late.bad_by_reason()) == {"corrupt_image"}
    trained = [tuple(x) for b in full for row in b["samples"] for x in row]
    assert trained and all(rec < GOOD or rec >= GOOD + BROKEN for _, rec in trained)
    assert f"bad {late.total('decode_failed')} (" in stats["summary"]


@pytest.mark.timeout(120)
def test_decode_drops_count_toward_the_bad_limit(tmp_path, demo_tok, tiny_cfg, cache_dir):
    root = str(tmp_path)
    recipe = _write(root, fraction="0.2")
    loader = _loader(recipe, root, demo_tok, tiny_cfg, cache_dir, num_workers=1)
    with pytest.raises(RuntimeError, match="exceeds bad_samples.max_fraction 20.00%") as e:
        _take(loader, 20)
    loader.close()
    assert "corrupt_image" in str(e.value) and "found when decoding" in str(e.value)
    assert loader.planner.stats.bad_total() == 0  # the planner alone saw nothing wrong


def _rank(rank, world, init_file, root, recipe, tok_dir, cache_dir, k, out):
    import torch.distributed as dist

    from megatron_vita.config.model import ModelConfig
    from megatron_vita.data.template import load_tokenizer

    torch.set_num_threads(1)  # as in DataLoader workers: the forked child never uses the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loader = build_train_loader(recipe, tokenizer=load_tokenizer(tok_dir), model_config=ModelConfig.from_name("tiny"),
                                    data_root=root, cache_dir=cache_dir, seed=5, dp_rank=rank, dp_size=world,
                                    num_workers=0, dp_group=dist.group.WORLD)
        _take(loader, k)
        # This rank's own drops, before state_dict()/stats() gather everyone's.
        result = {"local": loader._local.total("decode_failed"), "state": loader.state_dict(), "stats": loader.stats()}
        loader.close()
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_data_parallel_ranks_gather_their_drops(drops_root, demo_dir, demo_tok, tiny_cfg, cache_dir, tmp_path):
    import multiprocessing as mp

    root, recipe = drops_root
    k = 5
    ctx = mp.get_context("fork")  # the children reuse the imported modules (no 10 s re-import each)
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    procs = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "init"), root, recipe,
                                              os.path.join(demo_dir, "tokenizer"), cache_dir, k, outs[r]))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
        assert p.exitcode == 0
    r0, r1 = (json.load(open(o)) for o in outs)
    assert r0["state"] == r1["state"]  # a checkpoint may store any rank's state
    single = _loader(recipe, root, demo_tok, tiny_cfg, cache_dir, num_workers=0)
    _take(single, 2 * k)  # the same global stream: 2 packs per round
    ref = single.stats()
    single.close()
    total = DataStats()
    total.load_state_dict(ref["decode"])
    total = total.total("decode_failed")
    # Each pack is decoded by one rank only: no rank alone knows every drop.
    assert total >= 2 and r0["local"] + r1["local"] == total and min(r0["local"], r1["local"]) < total
    for r in (r0, r1):
        assert _counts(r["stats"]["combined"]) == _counts(ref["combined"])
        assert _counts(r["state"]["decode"]) == _counts(ref["decode"])


@pytest.mark.timeout(120)
def test_inspect_reports_decode_failures_and_renders_a_good_sample(tmp_path, demo_dir, capsys, cache_dir):
    root = str(tmp_path)
    recipe = _write(root, good=0)
    png = str(tmp_path / "s.png")
    assert main(["data", "inspect", "--recipe", recipe, "--data-root", root, "--tokenizer",
                 os.path.join(demo_dir, "tokenizer"), "--cache-dir", cache_dir, "--samples", "8",
                 "--packs", "2", "--png", png]) == 0
    out = capsys.readouterr().out
    assert f"bad:corrupt_image {BROKEN}" in out and "ok 2" in out
    assert "sample " in out and "0 tiles" in out and not os.path.exists(png)
