"""The per-rank batch under context parallelism: every token, label and feature lands exactly once.

No process group is needed: shard_batch is a pure function of (batch, rank, degree), so every
rank's share is computed here and put back together. Checked for packed documents (padded by
the split, or pre-padded by the loader) and unpacked rows, at CP 2 and 4: tokens / labels /
loss mask reassemble to the batch, position ids are true positions, and the vision tiles are
spread without replication: each tile runs on the ranks holding its feature tokens, a tile
runs on two ranks only when it straddles a chunk boundary, and every feature token is written
by exactly one rank.
"""
import pytest
import torch

from megatron_vita.config import ModelConfig
from megatron_vita.data.packing import collate_packs
from megatron_vita.data.template import image_token_ids, video_token_ids
from megatron_vita.parallel.context.batch import batch_layout, shard_batch, unshard_logits
from megatron_vita.parallel.context.layout import unpad_documents

CFG = ModelConfig.from_name("tiny")
T = CFG.num_image_token


def _docs(gen):
    """Documents of odd lengths (one of 1 token), with images of 1 and 3 tiles and 6 video frames."""
    import numpy as np

    out = []
    for media, tiles in ((image_token_ids(3, (1, 2), CFG.tokens, T, [7]), 3), ([], 0),
                         (video_token_ids(6, CFG.tokens, T), 6), (image_token_ids(1, (1, 1), CFG.tokens, T, []), 1)):
        text = torch.randint(0, 400, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        ids = text + media + text[:3] if media else [5]
        labels = ids[1:] + [-100]
        out.append((ids, labels, np.zeros((tiles, 56, 56, 3), np.uint8)))
    return out


def _batch(align: int):
    gen = torch.Generator().manual_seed(3)
    docs = _docs(gen)
    seq = 8 * -(-sum(-(-len(d[0]) // 8) * 8 for d in docs) // 8) + 16
    b = collate_packs([docs], seq, 0, True, T, CFG.tokens.context_ids, 56, True, normalize=False, align=align)
    b["pixel_values"] = torch.arange(b["pixel_values"].shape[0]).float()[:, None, None, None].expand(-1, 3, 56, 56)
    return b


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("prepadded", [False, True])
def test_every_token_and_feature_lands_exactly_once(cp, prepadded):
    multiple = 2 * cp
    batch = _batch(multiple if prepadded else 1)
    assert ("cu_seqlens_padded" in batch) == prepadded
    layout = batch_layout(batch, cp, multiple)
    shares = [shard_batch(batch, r, cp, multiple) for r in range(cp)]
    assert len({s["tokens"].shape[1] for s in shares}) == 1
    for key in ("tokens", "labels", "loss_mask"):
        parts = [s[key].unsqueeze(-1).float() for s in shares]
        assert torch.equal(unshard_logits(parts, batch, multiple)[..., 0], batch[key].float()), key
    for r, s in enumerate(shares):
        assert torch.equal(s["position_ids"][0], layout.positions(r))  # within each document
    assert sum(float(s["loss_mask"].sum()) for s in shares) == float(batch["loss_mask"].sum())

    n_tiles = batch["pixel_values"].shape[0]
    written = torch.zeros(n_tiles, T, dtype=torch.long)
    runs = torch.zeros(n_tiles, dtype=torch.long)
    for r, s in enumerate(shares):
        tiles = s["pixel_values"][:, 0, 0, 0].long()  # each tile carries its own index as its pixels
        idx = s["image_indices"]
        assert idx.shape == (2, tiles.numel(), T)
        runs[tiles] += 1
        for k, tile in enumerate(tiles.tolist()):
            mine = idx[1, k] >= 0
            assert mine.any(), "a rank runs the ViT only on tiles it holds tokens of"
            written[tile, mine] += 1
            # the feature lands on a context token of this rank's share
            ctx = torch.isin(s["tokens"][0, idx[1, k][mine]], torch.tensor(CFG.tokens.context_ids))
            assert ctx.all()
    assert (written == 1).all(), "every feature token is written by exactly one rank"
    # A tile runs on two ranks at most, and only when its tokens straddle a chunk boundary.
    assert runs.max() <= 2 and runs.min() >= 1
    owner = torch.empty(layout.total, dtype=torch.long)
    for r in range(cp):
        owner[layout.indices(r)] = r
    positions = batch["image_indices"][1] if prepadded else _padded_positions(batch, layout)
    straddling = torch.tensor([len(set(owner[p].tolist())) > 1 for p in positions])
    assert torch.equal(runs > 1, straddling)
    assert straddling.any() and (~straddling).any(), "the batch must hold both kinds of tiles"
    assert runs.sum() <= n_tiles + straddling.sum()


def _padded_positions(batch, layout):
    real = layout.cu_seqlens(padded=False)
    shift = torch.zeros(real[-1], dtype=torch.long)
    for a, b, p in zip(real, real[1:], layout.cu_seqlens(padded=True)):
        shift[a:b] = p - a
    pos = batch["image_indices"][1]
    return pos + shift[pos]


def test_unpacked_rows_split_as_one_causal_sequence():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 400, (2, 30), generator=gen)
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(2, 30)}
    shares = [shard_batch(batch, r, 2, 4) for r in range(2)]
    assert shares[0]["tokens"].shape == (2, 16)  # 30 padded to 32 at the end (causal: unseen)
    layout = batch_layout(batch, 2, 4)
    assert torch.equal(shares[1]["position_ids"][1], layout.indices(1))  # true positions in the sequence
    back = unshard_logits([s["tokens"].unsqueeze(-1) for s in shares], batch, 4)[..., 0]
    assert torch.equal(back, tokens)
    assert torch.equal(unpad_documents(torch.arange(32), layout), torch.arange(30))


def test_a_pack_for_another_layout_is_refused():
    batch = _batch(4)  # packed for CP 2
    with pytest.raises(ValueError, match="not padded to multiples of 8"):
        shard_batch(batch, 0, 4, 8)
