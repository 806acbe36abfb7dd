"""Context-parallel attention (ring, Ulysses, hybrid) equals plain attention on the whole sequence.

Every multi-process case runs on real gloo groups of 2 or 4 spawned ranks: each rank takes its
load-balanced share of q, k, v and of the upstream gradient, runs the CP attention forward and
backward, and the parent puts the outputs and dQ / dK / dV back in global order and compares them
with softmax attention computed in float64 on the whole padded sequence with an explicit mask
(causal or bidirectional, no attention across documents, bidirectional never seeing padding).
The cases cover GQA with fewer KV heads than the Ulysses degree (the repeat path), packed
documents of odd lengths including a 1-token one, tiles smaller than a rank's share, and ring
with and without send/recv overlap. Every case runs in one spawn of 4 ranks: CP 4 over all of
them and two CP 2 groups side by side.
"""
import math
import zlib

import pytest
import torch

from mv_testlib import spawn

TOL = 1e-5


def _case(name, algo, lengths, causal, hq=4, hkv=2, batch=2, ulysses=None, overlap=True, tile=3, d=8):
    return dict(name=name, algo=algo, lengths=tuple(lengths), causal=causal, hq=hq, hkv=hkv, batch=batch,
                ulysses=ulysses, overlap=overlap, tile=tile, d=d)


def _cases(world):
    algos = [("ring", None), ("ulysses", None)] + ([("hybrid", 2)] if world == 4 else [])
    out = []
    for algo, u in algos:
        out += [
            # hkv 2 < Ulysses degree 4 at CP 4: KV heads repeated
            _case(f"{algo}-causal", algo, [8 * world], True, ulysses=u),
            _case(f"{algo}-bidirectional", algo, [8 * world], False, ulysses=u),
            # hkv 1 < every Ulysses degree: repeat path; documents padded to 2*CP each
            _case(f"{algo}-packed-causal-gqa", algo, [5, 1, 7, 3], True, hkv=1, batch=1, ulysses=u),
            _case(f"{algo}-packed-bidirectional-gqa", algo, [5, 1, 6], False, hkv=1, batch=1, ulysses=u),
            _case(f"{algo}-packed-causal-mha", algo, [3, 9, 1], True, hkv=4, batch=1, ulysses=u, tile=1024),
        ]
    out += [_case("ring-causal-no-overlap", "ring", [8 * world], True, overlap=False),
            _case("ring-packed-no-overlap", "ring", [5, 1, 7, 3], True, hkv=1, batch=1, overlap=False)]
    return out


def _layout(case, cp):
    from megatron_vita.parallel.context import SeqLayout

    lengths = case["lengths"]
    return SeqLayout.single(lengths[0], cp) if len(lengths) == 1 else SeqLayout.packed(lengths, cp)


def _inputs(case, layout):
    """Global q, k, v, dout on the padded sequence, the same in every process."""
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    B, S, d = case["batch"], layout.total, case["d"]
    return [torch.randn(B, h, S, d, generator=gen) for h in (case["hq"], case["hkv"], case["hkv"], case["hq"])]


def _cp_ranks(rank, world, cases_by_cp):
    """Every case at every CP size: CP = world over all ranks, smaller CP over world/CP groups side by side."""
    from megatron_vita.parallel.context import context_parallel_attention, new_cp_groups, split_for_rank

    groups = {}
    for cp, cases in sorted(cases_by_cp.items()):  # the same new_group order in every process
        rank_lists = [list(range(i, i + cp)) for i in range(0, world, cp)]
        for key in sorted({(c["algo"], c["ulysses"] or 0) for c in cases}):
            groups[(cp, *key)] = new_cp_groups(rank_lists, key[0], key[1] or None)
    results = {}
    for cp, cases in cases_by_cp.items():
        for case in cases:
            g = groups[(cp, case["algo"], case["ulysses"] or 0)]
            layout = _layout(case, cp)
            q, k, v, dout = (split_for_rank(t, layout, g.rank, dim=2) for t in _inputs(case, layout))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out = context_parallel_attention(q, k, v, layout, g, causal=case["causal"], overlap=case["overlap"],
                                             tile=case["tile"])
            out.backward(dout)
            results[(cp, case["name"])] = (g.rank, [out.detach(), q.grad, k.grad, v.grad])
    return results


def _reference(case, layout):
    """float64 softmax attention over the padded global sequence, its output and dQ, dK, dV."""
    q, k, v, dout = (t.double().requires_grad_(i < 3) for i, t in enumerate(_inputs(case, layout)))
    S, cu = layout.total, layout.cu_seqlens()
    pos, doc, valid = torch.zeros(S, dtype=torch.long), torch.zeros(S, dtype=torch.long), torch.zeros(S, dtype=torch.bool)
    for i, (n, p) in enumerate(zip(layout.lengths, layout.padded)):
        pos[cu[i]:cu[i + 1]], doc[cu[i]:cu[i + 1]] = torch.arange(p), i
        valid[cu[i]:cu[i] + n] = True
    allow = (doc[:, None] == doc[None, :]) & ((pos[None, :] <= pos[:, None]) if case["causal"] else valid[None, :])
    g = case["hq"] // case["hkv"]
    scores = q @ k.repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(case["d"])
    out = scores.masked_fill(~allow, float("-inf")).softmax(-1) @ v.repeat_interleave(g, 1)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.timeout(300)
def test_ring_ulysses_and_hybrid_at_cp2_and_cp4_equal_full_attention():
    """One spawn of 4 gloo ranks: CP 4 over all of them, and two CP 2 groups ({0, 1}, {2, 3}) that
    both run every CP 2 case (as under data parallelism: several CP groups side by side)."""
    from megatron_vita.parallel.context import gather_from_ranks

    world, cases_by_cp = 4, {2: _cases(2), 4: _cases(4)}
    per_rank = spawn(_cp_ranks, world, cases_by_cp, timeout=280)
    failures = []
    for cp, cases in cases_by_cp.items():
        for case in cases:
            layout = _layout(case, cp)
            reference = _reference(case, layout)
            for first in range(0, world, cp):  # each CP group on its own
                ranked = sorted(per_rank[r][(cp, case["name"])] for r in range(first, first + cp))
                assert [cp_rank for cp_rank, _ in ranked] == list(range(cp))
                for i, what in enumerate(("out", "dq", "dk", "dv")):
                    got = gather_from_ranks([tensors[i] for _, tensors in ranked], layout, dim=2)
                    err = _rel(got, reference[i])
                    if not err <= TOL:
                        failures.append(f"CP{cp} ranks {first}-{first + cp - 1} {case['name']} {what}: "
                                        f"relative error {err:.2e}")
    assert not failures, "\n".join(failures)


def _peak_rss_growth(fn) -> int:
    """Bytes the resident set grows to above its current size while fn runs (Linux VmHWM reset)."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    base = status("VmRSS:")
    assert status("VmHWM:") <= base + (16 << 20), "the peak RSS did not reset"
    fn()
    return status("VmHWM:") - base


def test_block_attention_never_builds_a_whole_sequence_score_matrix():
    """4096 local tokens, 2 query heads: one [s, s] fp32 score matrix for them is 128 MiB; with
    256-row tiles the temporaries are a few MiB (production tiles are <= 1024 rows)."""
    from megatron_vita.parallel.context import DEFAULT_TILE, SeqLayout, ring_attention

    assert DEFAULT_TILE <= 1024
    S, layout = 4096, SeqLayout.single(4096, 1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, S, 16, generator=gen).requires_grad_()
    k, v = (torch.randn(1, 1, S, 16, generator=gen).requires_grad_() for _ in range(2))
    dout = torch.randn(1, 2, S, 16, generator=gen)

    def run():
        ring_attention(q, k, v, layout, causal=True, tile=256).backward(dout)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small tiles: two threads on a busy 2-core machine were 10x slower
    try:
        run()  # the first call also grows the allocator's own memory (about 40 MiB)
        growth = _peak_rss_growth(run)
    finally:
        torch.set_num_threads(threads)
    # measured: 3-5 MiB; 384 MiB with one tile of 4096 rows
    assert growth < 32 << 20, f"peak memory grew by {growth / 2**20:.0f} MiB"
    # The last query sees every key: its output is the softmax over all of them.
    w = (q[0, :, -1].detach() @ k[0, 0].detach().T / 4.0).softmax(-1)
    ref = w @ v[0, 0].detach()
    assert torch.allclose(ring_attention(q.detach(), k.detach(), v.detach(), layout)[0, :, -1], ref, atol=1e-5)


def test_tiles_and_merged_key_blocks_equal_one_softmax():
    """Any tile size, and two key blocks merged with the online-softmax rule, give one softmax."""
    from megatron_vita.parallel.context import Segment, attention_forward_, merge_, new_accumulator

    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 13, 8, generator=gen), *(torch.randn(2, 3, 11, 8, generator=gen) for _ in range(2))
    scale = 0.3
    ref = ((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * scale).softmax(-1) @ v.repeat_interleave(2, 1)
    for tile in (1, 4, 1024):
        out, lse = new_accumulator(q)
        attention_forward_(out, lse, q, k, v, [Segment(0, 13, 0, 11)], scale, tile=tile)
        assert torch.allclose(out, ref, atol=1e-6), tile
    parts = []
    for lo, hi in ((0, 5), (5, 11)):
        out, lse = new_accumulator(q)
        attention_forward_(out, lse, q, k, v, [Segment(0, 13, lo, hi)], scale, tile=4)
        parts.append((out, lse))
    (out, lse), (out2, lse2) = parts
    merge_(out, lse, out2, lse2)
    assert torch.allclose(out, ref, atol=1e-6)
    empty_out, empty_lse = new_accumulator(q)  # merging "no keys" changes nothing
    merge_(out, lse, empty_out, empty_lse)
    assert torch.allclose(out, ref, atol=1e-6) and torch.isfinite(lse).all()


def test_load_balanced_layout_of_packed_documents():
    from megatron_vita.parallel.context import (
        SeqLayout, gather_from_ranks, pad_documents, split_for_rank, unpad_documents,
    )

    layout = SeqLayout.packed([5, 1, 7, 3], 2)  # padded to multiples of 2*CP = 4
    assert layout.padded == (8, 4, 8, 4) and layout.cu_seqlens(padded=False) == [0, 5, 6, 13, 16]
    assert layout.local_cu_seqlens() == [0, 4, 6, 10, 12]
    # rank 0: chunks 0 and 3 of every document, rank 1: chunks 1 and 2
    assert layout.indices(0).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 18, 19, 20, 23]
    assert layout.positions(1).tolist() == [2, 3, 4, 5, 1, 2, 2, 3, 4, 5, 1, 2]
    assert layout.position_ids(1, reset=False).tolist() == layout.indices(1).tolist()
    tokens = torch.arange(16) + 100
    padded = pad_documents(tokens, layout, value=-1)
    assert padded.tolist()[:9] == [100, 101, 102, 103, 104, -1, -1, -1, 105]
    parts = [split_for_rank(padded, layout, r) for r in range(2)]
    assert torch.equal(unpad_documents(gather_from_ranks(parts, layout), layout), tokens)
    with pytest.raises(ValueError, match="multiple of 2\\*CP = 4"):
        SeqLayout.single(10, 2)


def test_cp_problems_refuse_what_cannot_run():
    from megatron_vita.parallel.context import cp_problems, normalize_algo

    # long-vita-14b (Qwen2.5-14B: 40 query / 8 KV heads) at TP 8: 5 query heads per rank
    assert cp_problems(40, 8, 8, 8, "megatron_cp_algo", None, 1048576, True) == []
    [line] = cp_problems(40, 8, 8, 8, "ulysses_cp_algo", None, 1048576, True)
    assert "--context-parallel-algo ulysses" in line and "40/8 = 5 query heads" in line and "use ring" in line
    [line] = cp_problems(40, 8, 8, 8, "hybrid_cp_algo", 2, 1048576, True)
    assert "--ulysses-degree-in-cp 2" in line and "no Ulysses degree fits: use ring" in line
    [line] = cp_problems(40, 8, 8, 8, "hybrid", 5, None, False)
    assert "--ulysses-degree-in-cp 5" in line and "divides --context-parallel-size 8" in line
    [line] = cp_problems(40, 8, 1, 16, "ulysses", None, None, False)
    assert "40/1 = 40 query heads" in line and "hybrid with --ulysses-degree-in-cp 2 or 4 or 8" in line
    assert cp_problems(40, 8, 2, 4, "ulysses", None, 4096, True) == []  # 8 KV heads/rank: no repeat needed
    assert cp_problems(4, 1, 1, 4, "ulysses", None, 64, False) == []  # 1 KV head: repeated, allowed
    [line] = cp_problems(4, 2, 1, 2, "ring", None, 1002, False)
    assert "--seq-length 1002" in line and "multiple of 4" in line
    [line] = cp_problems(4, 2, 4, 2, "ring", None, 1004, True)
    assert "multiple of 8" in line and "--sequence-parallel" in line
    assert cp_problems(4, 2, 4, 2, "ring", None, 1004, False) == []
    [line] = cp_problems(4, 2, 1, 4, "hybrid", None, 64, False)
    assert "needs --ulysses-degree-in-cp" in line
    [line] = cp_problems(4, 2, 1, 4, "ring", 2, 64, False)
    assert "--ulysses-degree-in-cp 2 only applies" in line
    [line] = cp_problems(4, 2, 1, 2, "zigzag", None, 64, False)
    assert "--context-parallel-algo 'zigzag'" in line
    assert [normalize_algo(a) for a in ("megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo")] == \
        ["ring", "ulysses", "hybrid"]
