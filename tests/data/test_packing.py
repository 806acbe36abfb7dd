"""Packing: the buffer rule by hand (per source, shared, none), boundaries incl. a 1-token document,
and that with reset no document attends across a boundary (expressed via cu_seqlens / position ids)."""
import numpy as np
import pytest
import torch

from megatron_vita.data.packing import Packer, collate_packs
from megatron_vita.data.template import IGNORE_INDEX


def refs(*specs):
    return [(ds, i, n, 0) for i, (ds, n) in enumerate(specs)]


def test_per_source_buffers_emit_when_full():
    p = Packer("per_source", 10)
    a, b, c, d, e = refs((0, 6), (1, 5), (0, 4), (0, 1), (1, 6))
    assert p.add(a) == [] and p.add(b) == [] and p.add(c) == []  # source 0: 6+4 = 10 fits exactly
    assert p.add(d) == [[a, c]]  # source 0 full: emitted, d starts a new buffer
    assert p.add(e) == [[b]]     # source 1: 5+6 > 10
    assert p.state_dict() == {"buffers": [[0, [list(d)]], [1, [list(e)]]]}


def test_shared_buffers_fill_exactly_then_emit_the_longest():
    p = Packer("shared", 10, num_buffers=2)
    a, b, c, d, e, f = refs((0, 7), (1, 5), (2, 4), (3, 3), (0, 1), (1, 2))
    for r in (a, b, c):
        assert p.add(r) == []      # [7] [5, 4]
    assert p.add(d) == []          # shortest is [7]: 7 + 3 = 10 fits exactly
    assert p.add(e) == []          # shortest is [5, 4]: 9 + 1 = 10
    assert p.buffers == {0: [a, d], 1: [b, c, e]}
    assert p.add(f) == [[a, d]]    # nothing fits: the longest (tie: the first) is emitted
    assert p.buffers == {0: [f], 1: [b, c, e]}


def test_shared_rule_step_by_step():
    p = Packer("shared", 10, num_buffers=2)
    a, b, c, d = refs((0, 7), (1, 6), (2, 5), (3, 2))
    assert p.add(a) == []          # [7] []
    assert p.add(b) == []          # [7] [6]
    assert p.add(c) == [[a]]       # shortest 6+5 > 10: the longest (7) is emitted, c takes its place
    assert p.buffers == {0: [c], 1: [b]}
    assert p.add(d) == []          # shortest is c (5): [5, 2]
    assert p.buffers == {0: [c, d], 1: [b]}


def test_none_mode_and_oversize_refused():
    p = Packer("none", 10)
    r = refs((0, 3))[0]
    assert p.add(r) == [[r]]
    with pytest.raises(ValueError):
        Packer("per_source", 10).add((0, 0, 11, 0))


def _doc(n, first_id, supervised_from=1):
    ids = list(range(first_id, first_id + n))
    labels = [ids[t + 1] if t + 1 >= supervised_from and t + 1 < n else IGNORE_INDEX for t in range(n)]
    return ids, labels, np.zeros((0, 8, 8, 3), np.uint8)


def test_boundaries_with_reset_and_a_one_token_document():
    docs = [_doc(5, 100), _doc(1, 200), _doc(3, 300)]
    b = collate_packs([docs], 12, 0, True, 4, [9999], 8, True)
    assert b["cu_seqlens"].tolist() == [0, 5, 6, 9, 12]  # trailing padding is its own segment
    assert b["cu_seqlens"].dtype == torch.int32
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 0, 1, 2]
    assert b["tokens"][0].tolist() == [100, 101, 102, 103, 104, 200, 300, 301, 302, 0, 0, 0]
    labels = b["labels"][0].tolist()
    assert labels == [101, 102, 103, 104, -100, -100, 301, 302, -100, -100, -100, -100]
    # No document attends across a boundary: the attention implied by cu_seqlens is block-diagonal
    # causal, and no position's target is a token of another document.
    cu = b["cu_seqlens"].tolist()
    seg = np.zeros(12, int)
    for k in range(len(cu) - 1):
        seg[cu[k]:cu[k + 1]] = k
    allowed = (seg[:, None] == seg[None, :]) & np.tri(12, dtype=bool)
    pos = b["position_ids"][0].numpy()
    assert all(pos[i] == (i - cu[seg[i]]) for i in range(12))  # positions restart at every boundary
    for i in range(11):
        if labels[i] != IGNORE_INDEX:
            assert seg[i] == seg[i + 1]
    assert allowed[6, 5] == False and allowed[5, 4] == False and allowed[8, 6]  # noqa: E712
    assert b["num_samples"] == 3 and b["max_seqlen"] == 5
    assert b["pixel_values"].shape == (0, 3, 8, 8) and b["image_indices"].shape == (2, 0, 4)


def test_exactly_full_pack_has_no_padding_segment():
    b = collate_packs([[_doc(4, 10), _doc(4, 20)]], 8, 0, True, 4, [9999], 8, True)
    assert b["cu_seqlens"].tolist() == [0, 4, 8]


def test_no_reset_continuous_positions_and_micro_batch_rows():
    rows = [[_doc(3, 10), _doc(2, 20)], [_doc(4, 30)]]
    b = collate_packs(rows, 6, 0, False, 4, [9999], 8, False)
    assert "cu_seqlens" not in b
    assert b["position_ids"].tolist() == [list(range(6))] * 2
    assert b["tokens"].tolist() == [[10, 11, 12, 20, 21, 0], [30, 31, 32, 33, 0, 0]]
    assert b["labels"][0].tolist() == [11, 12, -100, 21, -100, -100]  # still no target across documents
    with pytest.raises(ValueError, match="micro-batch size 1"):
        collate_packs(rows, 6, 0, True, 4, [9999], 8, True)
    with pytest.raises(ValueError, match="exceed"):
        collate_packs([[_doc(7, 1)]], 6, 0, False, 4, [9999], 8, False)


def test_feature_token_count_must_match_tiles():
    ids = [1, 9, 9, 2]
    with pytest.raises(ValueError, match="feature tokens"):
        collate_packs([[(ids, [IGNORE_INDEX] * 4, np.zeros((2, 8, 8, 3), np.uint8))]], 8, 0, True, 2, [9], 8, True)
    b = collate_packs([[(ids, [IGNORE_INDEX] * 4, np.zeros((1, 8, 8, 3), np.uint8))]], 8, 0, True, 2, [9], 8, True)
    assert b["image_indices"].tolist() == [[[0, 0]], [[1, 2]]]


def test_context_parallel_packing_pads_every_document_to_the_alignment():
    # CP 2: documents are split into 2*CP = 4 chunks each, so each takes a multiple of 4 tokens.
    p = Packer("shared", 16, num_buffers=1, align=4)
    a, b, c, d = refs((0, 5), (0, 1), (0, 6), (0, 3))
    assert p.add(a) == [] and p.add(b) == []  # 8 + 4 = 12 of 16
    assert p.add(c) == [[a, b]]                # 12 + 8 > 16 (the unaligned 5 + 1 + 6 = 12 would fit)
    p.add(d)
    restored = Packer("shared", 16, num_buffers=1, align=4)
    restored.load_state_dict(p.state_dict())
    assert restored._len(0) == 12              # c (8) + d (4): the resumed buffer counts padded lengths too
    with pytest.raises(ValueError, match="not a multiple of the packing alignment 4"):
        Packer("shared", 18, align=4)

    docs = [([1] * n, [5] * (n - 1) + [IGNORE_INDEX], np.zeros((0, 56, 56, 3), np.uint8)) for n in (5, 1, 6)]
    batch = collate_packs([docs], 24, 0, True, 4, [500], 56, True, align=4)
    assert batch["cu_seqlens"].tolist() == [0, 5, 6, 12, 16]          # real lengths (+ the trailing 4)
    assert batch["cu_seqlens_padded"].tolist() == [0, 8, 12, 20, 24]  # where each document sits
    tokens, labels = batch["tokens"][0], batch["labels"][0]
    assert tokens[:8].tolist() == [1] * 5 + [0] * 3 and tokens[8:12].tolist() == [1, 0, 0, 0]
    assert (labels[5:8] == IGNORE_INDEX).all() and batch["loss_mask"].sum() == 4 + 0 + 5
    assert batch["position_ids"][0, :12].tolist() == list(range(8)) + list(range(4))
    with pytest.raises(ValueError, match="exceed the sequence length 24"):  # 8 + 4 + 8 + 5 > 24 (real: 17)
        collate_packs([docs + docs[:1]], 24, 0, True, 4, [500], 56, True, align=4)
