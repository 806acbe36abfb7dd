"""Ring attention (MindSpeed's megatron_cp_algo) as a torch.autograd.Function over a process group.

Owns the ring: each rank holds its load-balanced share of q, k, v (layout.py: chunks r and
2R-1-r of every document); K/V blocks travel around the ring (send to rank r+1, receive from
r-1), so at step i rank r holds the K/V of rank j = (r - i) mod R and merges the attention of its
queries against them into a running (out, lse) with the online-softmax rule (blocks.py).

The three causal block rules (per document; c = chunk size, local = [chunk r | chunk 2R-1-r]):
  j == r  all queries vs all keys, causal (the diagonal block);
  j <  r  all queries vs the keys' first half only (chunk j precedes both query chunks), no mask;
  j >  r  the queries' second half only vs all keys (chunk 2R-1-r follows both key chunks), no mask.
Bidirectional attention uses every pair, with each document's padding keys left out.

Overlap (`overlap=True`, Megatron's --use-cp-send-recv-overlap): the transfer of the next K/V
block is posted before the current block is computed, so communication hides behind compute.

The kernels are pluggable: `block_forward` (e.g. an NPU fused-attention kernel that returns the
block's row max and sum, which become its lse) and `block_backward` (its gradient kernel, fed the
final statistics). Backward recomputes each block from the saved (q, k, v, out, lse) instead of
keeping the probabilities: dQ accumulates locally; each block's dK/dV accumulator travels the ring with it,
every rank adding its share, and after R steps arrives back at the block's owner. Gradient
accumulators and the travelling dK/dV are fp32.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megatron_vita.parallel.context.blocks import (
    DEFAULT_TILE, Segment, attention_backward_, attention_forward_, new_accumulator,
)
from megatron_vita.parallel.context.layout import SeqLayout

# A forward step's kernel: merges the attention of q against one K/V block into (out, lse) in place,
# with attention_forward_'s arguments (out, lse, q, k, v, segments, scale, q_pos, k_pos, tile).
BlockForward = Callable[..., None]
# A backward step's kernel: adds one K/V block's share of dQ and its dK, dV (fp32) in place, from the
# FINAL out / lse: (dq, dk, dv, q, k, v, dout, out, lse, delta, segments, scale, q_pos, k_pos, tile).
BlockBackward = Callable[..., None]
KV_TAG, GRAD_TAG = 0, 1  # distinct tags: with two ranks, next and previous are the same peer


class RingComm:
    """Shift a tensor one step around the ring: send to rank+1, receive from rank-1 (non-blocking)."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, tensor: torch.Tensor, tag: int):
        """Post the transfer; returns a handle for wait(). batch_isend_irecv pairs the send and the
        receive in one group call, so NCCL / HCCL cannot deadlock on the order ranks post them."""
        recv = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(handle) -> torch.Tensor:
        recv, works = handle
        for w in works:
            w.wait()
        return recv


class RingPlan:
    """Host-side description of one ring attention call: who is where and what attends to what."""

    def __init__(self, layout: SeqLayout, group=None, causal: bool = True, scale: Optional[float] = None,
                 overlap: bool = True, tile: int = DEFAULT_TILE, block_forward: Optional[BlockForward] = None,
                 block_backward: Optional[BlockBackward] = None):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        if layout.degree != self.size:
            raise ValueError(f"layout split over {layout.degree} ranks, ring group of {self.size}")
        self.layout, self.causal, self.scale, self.overlap, self.tile = layout, causal, scale, overlap, tile
        self.block_forward = block_forward or attention_forward_
        self.block_backward = block_backward or torch_block_backward_
        self.positions = [layout.positions(j) for j in range(self.size)]
        self.cu = layout.local_cu_seqlens()

    def segments(self, j: int) -> List[Segment]:
        """What the local queries attend to in the K/V block of ring rank j (the block rules)."""
        r, segs = self.rank, []
        for i, (real, half) in enumerate(zip(self.layout.lengths, self.layout.chunk_sizes)):
            a, b = self.cu[i], self.cu[i + 1]
            if not self.causal:
                valid = int((self.positions[j][a:b] < real).sum())
                if valid:
                    segs.append(Segment(a, b, a, a + valid))
            elif j == r:
                segs.append(Segment(a, b, a, b, causal=True))
            elif j < r:
                segs.append(Segment(a, b, a, a + half))
            else:
                segs.append(Segment(a + half, b, a, b))
        return segs


def torch_block_backward_(dq, dk, dv, q, k, v, dout, out, lse, delta, segments, scale, q_pos=None, k_pos=None,
                          tile: int = DEFAULT_TILE) -> None:
    """The default backward step: blocks.attention_backward_ (which takes delta, not out)."""
    attention_backward_(dq, dk, dv, q, k, v, dout, lse, delta, segments, scale, q_pos, k_pos, tile)


def _flat(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unflat(buf: torch.Tensor, k_shape):
    n = math.prod(k_shape)
    return buf[:n].view(k_shape), buf[n:].view(k_shape)


class RingAttention(torch.autograd.Function):
    """q [B, hq, s, d], k / v [B, hkv, s, d], each rank's local tokens -> out [B, hq, s, d] (q's dtype)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        scale = plan.scale if plan.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        comm = RingComm(plan.group) if plan.size > 1 else None
        out, lse = new_accumulator(q)
        kv = _flat(k, v)
        for step in range(plan.size):
            j = (plan.rank - step) % plan.size
            last = step == plan.size - 1
            pending = comm.shift(kv, KV_TAG) if plan.overlap and not last else None
            kb, vb = _unflat(kv, k.shape)
            plan.block_forward(out, lse, q, kb, vb, plan.segments(j), scale, plan.positions[plan.rank],
                               plan.positions[j], plan.tile)
            if not last:
                kv = RingComm.wait(pending or comm.shift(kv, KV_TAG))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        comm = RingComm(plan.group) if plan.size > 1 else None
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = _flat(k, v)
        dkv_handle, dkv = None, None
        for step in range(plan.size):
            j = (plan.rank - step) % plan.size
            last = step == plan.size - 1
            pending = comm.shift(kv, KV_TAG) if plan.overlap and not last else None
            kb, vb = _unflat(kv, k.shape)
            # This block's grads go to a fresh buffer, so the accumulated dK/dV of the block (sent by
            # the previous rank) can still be in flight while this rank computes its share.
            grads = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            dkb, dvb = _unflat(grads, k.shape)
            plan.block_backward(dq, dkb, dvb, q, kb, vb, dout, out, lse, delta, plan.segments(j), scale,
                                plan.positions[plan.rank], plan.positions[j], plan.tile)
            if dkv_handle is not None:
                grads += RingComm.wait(dkv_handle)
            if comm is None:
                dkv = grads
            else:
                # Passed on even after the last step: that hop brings every block home to its owner.
                dkv_handle = comm.shift(grads, GRAD_TAG)
                if not plan.overlap:
                    grads = RingComm.wait(dkv_handle)
                    dkv_handle = (grads, [])
            if not last:
                kv = RingComm.wait(pending or comm.shift(kv, KV_TAG))
        if dkv_handle is not None:
            dkv = RingComm.wait(dkv_handle)
        dk, dv = _unflat(dkv, k.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SeqLayout, group=None,
                   causal: bool = True, scale: Optional[float] = None, overlap: bool = True,
                   tile: int = DEFAULT_TILE, block_forward: Optional[BlockForward] = None,
                   block_backward: Optional[BlockBackward] = None) -> torch.Tensor:
    """Attention of this rank's load-balanced tokens against the whole sequence held by `group`.

    q [B, hq, s_local, d]; k, v [B, hkv, s_local, d] (hq a multiple of hkv: GQA); the tokens are
    `layout.indices(rank)` of the padded global sequence (layout.degree == the group's size, or 1
    with group None: plain attention that keeps no probabilities for backward). `block_forward`: the
    kernel of each forward step, with attention_forward_'s signature and in-place merge (default:
    attention_forward_ itself); `block_backward`: each backward step's (default: attention_backward_)."""
    if q.shape[2] != layout.local_length or k.shape[2] != layout.local_length:
        raise ValueError(f"local sequence of {q.shape[2]} queries / {k.shape[2]} keys, the layout gives each rank "
                         f"{layout.local_length}")
    plan = RingPlan(layout, group, causal, scale, overlap, tile, block_forward, block_backward)
    return RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan)
