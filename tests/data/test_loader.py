"""Order and resume: deterministic batches, exact resume after K batches (DataLoader workers included,
across an epoch boundary), DP ranks splitting one global stream, resuming at another DP size, and a
state saved for other data being refused."""
import json
import os

import pytest
import torch

from megatron_vita.data.loader import build_train_loader

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "data_recipes", "demo.yaml")


@pytest.fixture(scope="module")
def make(demo_dir, demo_tok, tiny_cfg, cache_dir):
    loaders = []

    def _make(recipe=RECIPE, **kw):
        kw.setdefault("seed", 7)
        kw.setdefault("num_workers", 0)
        loader = build_train_loader(recipe, tokenizer=demo_tok, model_config=tiny_cfg, data_root=demo_dir,
                                    cache_dir=cache_dir, **kw)
        loaders.append(loader)
        return loader

    yield _make
    for loader in loaders:
        loader.close()


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def test_resume_after_k_batches_equals_uninterrupted(make):
    k = 14
    full = take(make(num_workers=0), 2 * k)
    first = make(num_workers=2)
    head = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    first.close()
    assert len(json.dumps(state)) < 20_000
    resumed = make(num_workers=2, state=state)
    assert resumed.planner.position == state["planner"]["position"]  # restored, nothing replayed
    tail = take(resumed, k)
    assert_same(head, full[:k])  # workers do not change the batches
    assert_same(tail, full[k:])
    epoch_len = resumed.planner.order.total
    assert state["planner"]["position"] < epoch_len < resumed.state_dict()["planner"]["position"]
    b = full[0]
    assert b["tokens"].shape == (1, 256) and b["cu_seqlens"][-1] == 256 and b["pixel_values"].shape[1:] == (3, 56, 56)
    assert b["image_indices"].shape == (2, b["pixel_values"].shape[0], 4)


def test_dp_ranks_split_the_stream_and_resume_at_another_dp_size(make):
    k = 4
    ref = take(make(), 3 * k + 2)
    r0, r1 = make(dp_rank=0, dp_size=2), make(dp_rank=1, dp_size=2)
    a0, a1 = take(r0, k), take(r1, k)
    assert_same(a0, ref[0:2 * k:2])
    assert_same(a1, ref[1:2 * k:2])
    s0, s1 = r0.state_dict(), r1.state_dict()
    assert s0["planner"] == s1["planner"] and s0["fingerprint"] == s1["fingerprint"]
    assert_same(take(make(state=s0), k), ref[2 * k:3 * k])             # DP 2 -> 1, exact
    assert_same(take(make(dp_rank=1, dp_size=2, state=s1), 1), [ref[2 * k + 1]])  # same DP size


def test_counters_and_state_refused_for_other_data(make):
    loader = make()
    take(loader, 3)
    st = loader.stats()
    counts = st["planner"]["counts"]
    assert set(counts) == {"train/image_colour.jsonl", "train/image_shape.jsonl", "train/video_motion.jsonl",
                           "train/text.jsonl"}
    assert sum(c.get("seen", 0) for c in counts.values()) == loader.state_dict()["planner"]["position"]
    assert "samples seen" in st["summary"]
    with pytest.raises(ValueError, match="different recipe, data, seed or tokenizer"):
        make(seed=8, state=loader.state_dict())
    with pytest.raises(ValueError, match="micro-batch-size 1"):
        make(micro_batch_size=2)



def test_cross_dataset_packing_without_reset_in_micro_batches(make, tmp_path):
    text = open(RECIPE).read().replace("mode: per_source\n  reset: true", "mode: shared\n  reset: false")
    assert "mode: shared" in text
    (tmp_path / "shared.yaml").write_text(text)
    recipe = str(tmp_path / "shared.yaml")
    ref = take(make(recipe=recipe), 4)
    mine = take(make(recipe=recipe, micro_batch_size=2, dp_size=2, dp_rank=1), 1)[0]
    assert "cu_seqlens" not in mine and mine["tokens"].shape == (2, 256)
    assert torch.equal(mine["tokens"], torch.cat([ref[2]["tokens"], ref[3]["tokens"]]))  # packs 2, 3 of the stream
    assert torch.equal(mine["position_ids"], torch.arange(256).expand(2, 256))
    n0 = ref[2]["pixel_values"].shape[0]
    assert torch.equal(mine["pixel_values"], torch.cat([ref[2]["pixel_values"], ref[3]["pixel_values"]]))
    assert (mine["image_indices"][0, :n0] == 0).all() and (mine["image_indices"][0, n0:] == 1).all()
    # Shared buffers mix datasets: some sequence holds both image (497) and video (500) feature tokens.
    assert any(bool((r["tokens"] == 497).any()) and bool((r["tokens"] == 500).any()) for r in ref)


def test_uint8_pixels_normalised_on_the_consumer_side_are_identical(make):
    from megatron_vita.data.image import normalize_pixels

    ref = take(make(), 3)
    raw = take(make(normalize=False), 3)
    for a, b in zip(ref, raw):
        assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape == a["pixel_values"].shape
        assert torch.equal(normalize_pixels(b["pixel_values"]), a["pixel_values"])
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["image_indices"], b["image_indices"])
