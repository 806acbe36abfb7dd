"""Context-parallel attention: ring, Ulysses and hybrid behind one call, and their process groups.

Owns the composition and the Ulysses communication. A CP group of CP = U * R ranks is viewed as
R ring ranks of U Ulysses ranks each (MindSpeed's hybrid_cp_algo): Ulysses groups are runs of U
consecutive CP ranks, ring groups take every U-th rank, and CP rank c = ring_rank * U +
ulysses_rank. Ring (megatron_cp_algo) is U = 1, Ulysses (ulysses_cp_algo) is R = 1.

Every rank holds its load-balanced share of the sequence at degree CP (layout.py). Inside a
Ulysses group one all-to-all gives each rank 1/U of the heads for the tokens of the whole group
(q, k and v in ONE exchange, heads concatenated per destination); those tokens are exactly ring
rank g's share of the same documents split over R ranks, so one fixed permutation puts them in
that order, ring attention runs over the R ring ranks (for R = 1: locally on the whole
sequence), and the inverse permutation and all-to-all return each token's output to its owner.
When the KV heads do not split over U (GQA with fewer KV heads per TP rank than the degree)
each KV head is repeated just enough times that they do, keeping every query head with its own.

`all_to_all_single` works over gloo (checked on the CPU), nccl and hccl; its adjoint is itself
(it only exchanges blocks between ranks), which makes the exchange autograd-correct.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_vita.parallel.context.blocks import DEFAULT_TILE
from megatron_vita.parallel.context.layout import SeqLayout
from megatron_vita.parallel.context.ring import BlockBackward, BlockForward, ring_attention
from megatron_vita.parallel.context.validate import normalize_algo, ulysses_degree_for


@dataclass
class CPGroups:
    """This rank's Ulysses and ring groups (None where that level has a single rank)."""

    algo: str
    ulysses: Optional[dist.ProcessGroup]
    ring: Optional[dist.ProcessGroup]
    ulysses_size: int = 1
    ulysses_rank: int = 0
    ring_size: int = 1
    ring_rank: int = 0

    @property
    def size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def rank(self) -> int:
        """This rank's place in the CP group, which decides its tokens (layout.indices(rank))."""
        return self.ring_rank * self.ulysses_size + self.ulysses_rank


def new_cp_groups(cp_rank_lists: Sequence[Sequence[int]], algo: str = "ring",
                  ulysses_degree: Optional[int] = None) -> CPGroups:
    """Create the Ulysses / ring sub-groups of every CP group and return this rank's.

    Collective over the default group: every process calls it with the same `cp_rank_lists`
    (every CP group's global ranks in CP-rank order, e.g. megatron's CP groups), because
    torch.distributed.new_group must be called by all processes for every group."""
    me = dist.get_rank()
    cp = len(cp_rank_lists[0])
    U = ulysses_degree_for(algo, cp, ulysses_degree)
    R = cp // U
    out = CPGroups(normalize_algo(algo), None, None, U, 0, R, 0)
    for ranks in cp_rank_lists:
        ranks = list(ranks)
        if len(ranks) != cp or ranks != sorted(ranks):
            raise ValueError(f"CP group {ranks}: every group needs {cp} ranks in ascending order "
                             "(torch orders a group's ranks by their global rank)")
        if U > 1:
            for g in range(R):
                sub = ranks[g * U:(g + 1) * U]
                pg = dist.new_group(sub)
                if me in sub:
                    out.ulysses, out.ulysses_rank, out.ring_rank = pg, sub.index(me), g
        if R > 1:
            for u in range(U):
                sub = ranks[u::U]
                pg = dist.new_group(sub)
                if me in sub:
                    out.ring, out.ring_rank, out.ulysses_rank = pg, sub.index(me), u
    return out


class _AllToAll(torch.autograd.Function):
    """Block u of dim 0 goes to rank u; block u of the result came from rank u (equal blocks)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all_to_all_single along dim 0 (dim 0 = the group size)."""
    if x.shape[0] != dist.get_world_size(group):
        raise ValueError(f"all-to-all over {dist.get_world_size(group)} ranks needs dim 0 of that size, got {x.shape[0]}")
    return _AllToAll.apply(x, group)


def kv_repeats(num_heads: int, num_kv_heads: int, degree: int) -> int:
    """How many times each KV head is repeated so the KV heads split over `degree` ranks (1: none).

    The smallest r with degree | num_kv_heads * r. Query head i keeps its KV head: it used
    i // (hq / hkv) and uses i // (hq / (r * hkv)) of the heads repeated in place (r consecutive
    copies), the same head because r divides the group size (degree divides hq)."""
    if num_heads % degree:
        raise ValueError(f"{num_heads} query heads per TP rank do not split over a Ulysses degree of {degree}")
    return degree // math.gcd(num_kv_heads, degree)


def seq_to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group) -> Tuple[torch.Tensor, ...]:
    """[B, h, s, d] of this rank's tokens -> [B, h/U, U*s, d]: the group's tokens (rank by rank), my heads.

    Rank u receives head slice u of q, of k and of v (k / v already holding a multiple of U heads)."""
    U = dist.get_world_size(group)
    B, s, d = q.shape[0], q.shape[2], q.shape[3]
    hq, hkv = q.shape[1] // U, k.shape[1] // U
    parts = [t.reshape(B, U, t.shape[1] // U, s, d) for t in (q, k, v)]
    x = torch.cat(parts, dim=2).transpose(0, 1)  # [U (destination), B, (hq+2hkv)/U, s, d]
    x = all_to_all(x, group)  # [U (source), B, heads, s, d]
    x = x.permute(1, 2, 0, 3, 4).reshape(B, hq + 2 * hkv, U * s, d)
    return x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]


def heads_to_seq(out: torch.Tensor, group) -> torch.Tensor:
    """Inverse of seq_to_heads for the output: [B, h/U, U*s, d] -> [B, h, s, d] of this rank's tokens."""
    U = dist.get_world_size(group)
    B, h, S, d = out.shape
    x = out.reshape(B, h, U, S // U, d).permute(2, 0, 1, 3, 4)  # [U (destination: token owner), B, h/U, s, d]
    x = all_to_all(x, group)  # [U (source: head slice), B, h/U, s, d]
    return x.transpose(0, 1).reshape(B, U * h, S // U, d)


@functools.lru_cache(maxsize=64)
def _ulysses_order(layout: SeqLayout, ulysses_size: int, ring_rank: int):
    """Permutation from the Ulysses-gathered token order to ring rank `ring_rank`'s order, and back."""
    gathered = torch.cat([layout.indices(ring_rank * ulysses_size + u) for u in range(ulysses_size)])
    target = layout.with_degree(layout.degree // ulysses_size).indices(ring_rank)
    where = torch.full((layout.total,), -1, dtype=torch.long)
    where[gathered] = torch.arange(gathered.numel())
    perm = where[target]
    if perm.numel() != gathered.numel() or bool((perm < 0).any()):
        raise AssertionError("the Ulysses group does not hold its ring rank's tokens")
    return perm, torch.argsort(perm)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SeqLayout,
                               groups: CPGroups, causal: bool = True, scale: Optional[float] = None,
                               overlap: bool = True, tile: int = DEFAULT_TILE,
                               block_forward: Optional[BlockForward] = None,
                               block_backward: Optional[BlockBackward] = None) -> torch.Tensor:
    """Attention over the whole (packed) sequence from this rank's share of it.

    q [B, hq, s_local, d], k / v [B, hkv, s_local, d] (hq / hkv heads of this TP rank), holding
    `layout.indices(groups.rank)` of the padded global sequence; returns [B, hq, s_local, d].
    `causal` False is bidirectional attention inside each document (padding keys excluded).
    `block_forward` / `block_backward`: the ring's kernels per K/V block (ring.ring_attention; default: torch)."""
    if layout.degree != groups.size:
        raise ValueError(f"layout split over {layout.degree} ranks, context-parallel group of {groups.size}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    U = groups.ulysses_size
    if U == 1:
        return ring_attention(q, k, v, layout, groups.ring, causal, scale, overlap, tile, block_forward,
                              block_backward)
    rep = kv_repeats(q.shape[1], k.shape[1], U)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q, k, v = seq_to_heads(q, k, v, groups.ulysses)
    perm, inverse = (t.to(q.device) for t in _ulysses_order(layout, U, groups.ring_rank))
    q, k, v = (t.index_select(2, perm) for t in (q, k, v))
    out = ring_attention(q, k, v, layout.with_degree(groups.ring_size), groups.ring, causal, scale, overlap, tile,
                         block_forward, block_backward)
    return heads_to_seq(out.index_select(2, inverse), groups.ulysses)
