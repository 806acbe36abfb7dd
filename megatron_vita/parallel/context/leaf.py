"""The context-parallel core-attention spec leaf: megatron's `core_attention` slot under CP > 1.

Owns the adaptation between megatron's attention calling convention and the CP attention of
this package. SelfAttention hands the leaf this rank's share of the sequence after the QKV
projection and RoPE (megatron-core applies RoPE for the same load-balanced layout: chunks r and
2CP-1-r, per document under `thd`):
  sbhd  query [s_local, b, hq, d]: one unpacked sequence per row, split over CP as a whole;
  thd   query [t_local, hq, d] with PackedSeqParams whose cu_seqlens_q are the GLOBAL real
        document boundaries and cu_seqlens_q_padded the GLOBAL boundaries once each document is
        padded to the CP multiple (TransformerEngine's convention): the leaf rebuilds the
        SeqLayout from them, so no attention crosses a document.
The output has the leaf's usual shape ([s_local, b, hq*d] or [t_local, hq*d]). The algorithm
(ring / Ulysses / hybrid) and its groups come from the layout (parallel.state.cp_groups), so the
model code is the same at every CP size; only the leaf chosen by models.common.leaves differs.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_vita.models.common.attention import CoreAttention
from megatron_vita.parallel.context.attention import context_parallel_attention
from megatron_vita.parallel.context.layout import SeqLayout


@functools.lru_cache(maxsize=64)
def _packed_layout(real: Tuple[int, ...], padded: Tuple[int, ...], degree: int) -> SeqLayout:
    return SeqLayout(tuple(b - a for a, b in zip(real, real[1:])), tuple(b - a for a, b in zip(padded, padded[1:])),
                     degree)


def layout_from_packed(params: PackedSeqParams, degree: int) -> SeqLayout:
    """The global document layout described by megatron's PackedSeqParams (see module docstring)."""
    real = params.cu_seqlens_q
    padded = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else real
    return _packed_layout(tuple(int(x) for x in real.tolist()), tuple(int(x) for x in padded.tolist()), degree)


class ContextParallelAttention(CoreAttention):
    """CoreAttention over the whole (packed) sequence from this rank's share of it."""

    # The ring's kernels per K/V block (None: blocks.attention_forward_ / ring.torch_block_backward_,
    # plain torch); a backend's subclass sets its fused kernels here (staticmethods, same signatures).
    block_forward = None
    block_backward = None

    def attend(self, query, key, value, attention_mask, mask_type: AttnMaskType,
               packed_seq_params: Optional[PackedSeqParams]) -> torch.Tensor:
        from megatron_vita.parallel.state import cp_groups, cp_send_recv_overlap

        groups = cp_groups()
        if groups is None:
            raise RuntimeError("context-parallel attention needs the CP groups of "
                               "megatron_vita.parallel.state.initialize_parallel (context_parallel_size > 1)")
        if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise NotImplementedError(f"context-parallel attention supports causal or no mask, not {mask_type}")
        if key.shape[0] != query.shape[0]:
            raise NotImplementedError("context-parallel attention has no KV-cache decoding (queries and keys "
                                      "must cover the same tokens)")
        kw = dict(causal=mask_type == AttnMaskType.causal, scale=self.softmax_scale, overlap=cp_send_recv_overlap(),
                  block_forward=self.block_forward, block_backward=self.block_backward)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            layout = layout_from_packed(packed_seq_params, groups.size)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, h, t, d]
            out = context_parallel_attention(q, k, v, layout, groups, **kw)[0].transpose(0, 1)
            return out.reshape(out.shape[0], -1)
        layout = SeqLayout.single(query.shape[0] * groups.size, groups.size)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = context_parallel_attention(q, k, v, layout, groups, **kw).permute(2, 0, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)
