"""The npu_fusion_attention attention leaves of `--use-flash-attn` (features/flash_attention.py).

Owns the glue between megatron's attention calling convention and the kernel's contract
(shared/reference/npu.md); the case table is in flash_attention's docstring. Imported only when
the feature builds a model (it imports torch and megatron-core); `torch_npu` is imported at call
time, so the test emulation (tests/emulation/torch_npu) answers on CPU.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_vita.models.common.attention import CoreAttention
from megatron_vita.parallel.context.blocks import merge_
from megatron_vita.parallel.context.leaf import ContextParallelAttention

COMPRESSED_MASK_SIZE = 2048
SPARSE_CAUSAL_TOP_LEFT, SPARSE_CAUSAL_BOTTOM_RIGHT = 2, 3


@functools.lru_cache(maxsize=8)
def _compressed_mask(device: torch.device) -> torch.Tensor:
    # sparse modes 2 / 3 take this one mask whatever the sequence lengths; built once per device
    n = COMPRESSED_MASK_SIZE
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(diagonal=1)


def causal_kwargs(device: torch.device, sq: int, sk: int) -> dict:
    """Causal attention of sq queries against sk keys, the queries being the last sq positions."""
    mode = SPARSE_CAUSAL_TOP_LEFT if sq == sk else SPARSE_CAUSAL_BOTTOM_RIGHT
    return dict(atten_mask=_compressed_mask(torch.device(device)), sparse_mode=mode)


def tnd_lengths(cu_q: torch.Tensor, cu_kv: torch.Tensor) -> Tuple[List[int], List[int]]:
    """megatron's cu_seqlens (leading 0, possibly empty documents) -> the kernel's cumulative ENDS
    without the leading 0, empty documents dropped (TND takes strictly increasing ends)."""
    q, kv = [int(x) for x in cu_q.tolist()], [int(x) for x in cu_kv.tolist()]
    if len(q) != len(kv) or q[0] != 0 or kv[0] != 0:
        raise ValueError(f"cu_seqlens_q {q} and cu_seqlens_kv {kv}: one entry per boundary, both starting at 0")
    ends_q, ends_kv = [], []
    for i in range(1, len(q)):
        nq, nkv = q[i] - q[i - 1], kv[i] - kv[i - 1]
        if nq == 0 and nkv == 0:
            continue
        if nq <= 0 or nkv <= 0:
            raise ValueError(f"document {i - 1} has {nq} queries and {nkv} keys (cu_seqlens {q} / {kv})")
        ends_q.append(q[i])
        ends_kv.append(kv[i])
    return ends_q, ends_kv


def _segment_kwargs(seg, q: torch.Tensor, q_pos: Optional[torch.Tensor], k_pos: Optional[torch.Tensor]) -> dict:
    """The mask arguments of one ring segment: none, or the compressed causal mask of a diagonal
    block (the same positions on both sides, so the positional mask is the index mask sparse_mode 2
    applies)."""
    if not seg.causal:
        return {}
    same = (seg.q1 - seg.q0 == seg.k1 - seg.k0 and q_pos is not None and k_pos is not None
            and torch.equal(q_pos[seg.q0:seg.q1], k_pos[seg.k0:seg.k1]))
    if not same:
        raise ValueError(f"causal block {seg} is not a diagonal block: sparse_mode 2 cannot express it")
    return dict(atten_mask=_compressed_mask(q.device), sparse_mode=SPARSE_CAUSAL_TOP_LEFT)


def _rows_stat(x: torch.Tensor) -> torch.Tensor:
    """[B, N, S] -> the kernel's [B, N, S, 8] fp32 statistic (one value replicated over the 8)."""
    return x.float().unsqueeze(-1).expand(*x.shape, 8).contiguous()


def npu_block_forward_(out, lse, q, k, v, segments, scale: float, q_pos: Optional[torch.Tensor] = None,
                       k_pos: Optional[torch.Tensor] = None, tile: Optional[int] = None) -> None:
    """blocks.attention_forward_ through the kernel: merge each segment's attention into (out, lse).

    q [B, hq, sq, d], k / v [B, hkv, sk, d] (BNSD); `tile` is unused (the kernel tiles itself)."""
    import torch_npu

    for seg in segments:
        blk_out, softmax_max, softmax_sum = torch_npu.npu_fusion_attention(
            q[:, :, seg.q0:seg.q1], k[:, :, seg.k0:seg.k1], v[:, :, seg.k0:seg.k1], q.shape[1], "BNSD",
            scale=scale, **_segment_kwargs(seg, q, q_pos, k_pos))[:3]
        m, l = softmax_max[..., 0], softmax_sum[..., 0]  # [B, hq, rows]: row max, row sum of exp(s - m)
        seen = l > 0
        blk_lse = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), float("-inf"))
        merge_(out[:, :, seg.q0:seg.q1], lse[:, :, seg.q0:seg.q1], blk_out.float(), blk_lse)


def npu_block_backward_(dq, dk, dv, q, k, v, dout, out, lse, delta, segments, scale: float,
                        q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                        tile: Optional[int] = None) -> None:
    """ring.torch_block_backward_ through npu_fusion_attention_grad: add each segment's dQ, dK, dV.

    The kernel recomputes the probabilities from the statistics it is given; the ring has one per
    query row, the FINAL lse over every key, so softmax_max = lse and softmax_sum = 1 give
    exp(s - lse), each pair's true probability (a row that saw no key gets +inf: probability 0). It
    takes delta from dout and the final output (attention_in) itself; `delta` is unused."""
    import torch_npu

    stat_max = _rows_stat(lse.masked_fill(lse == float("-inf"), float("inf")))
    stat_sum = torch.ones_like(stat_max)
    for seg in segments:
        rows, keys = slice(seg.q0, seg.q1), slice(seg.k0, seg.k1)
        gq, gk, gv = torch_npu.npu_fusion_attention_grad(
            q[:, :, rows], k[:, :, keys], v[:, :, keys], dout[:, :, rows], q.shape[1], "BNSD",
            softmax_max=stat_max[:, :, rows], softmax_sum=stat_sum[:, :, rows], attention_in=out[:, :, rows],
            scale_value=scale, **_segment_kwargs(seg, q, q_pos, k_pos))[:3]
        dq[:, :, rows] += gq.float()
        dk[:, :, keys] += gk.float()
        dv[:, :, keys] += gv.float()


class NPUCoreAttention(CoreAttention):
    """CoreAttention through npu_fusion_attention (sbhd as SBH, thd as TND)."""

    def _keep_prob(self) -> float:
        return 1.0 - self.dropout if self.training else 1.0

    def attend(self, query, key, value, attention_mask, mask_type, packed_seq_params):
        import torch_npu

        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._attend_packed(query, key, value, mask_type, packed_seq_params)
        sq, b, hq, d = query.shape
        sk = key.shape[0]
        kw = {}
        if mask_type == AttnMaskType.causal:
            kw = causal_kwargs(query.device, sq, sk)
        elif mask_type in (AttnMaskType.padding, AttnMaskType.arbitrary) and attention_mask is not None:
            # megatron's masks broadcast ([b, 1, 1, sk] for padding); the kernel takes B1SS / BNSS
            mask = attention_mask.bool()
            if mask.dim() == 4:
                mask = mask.expand(b, mask.shape[1], sq, sk)
            kw = dict(atten_mask=mask, sparse_mode=0)
        out = torch_npu.npu_fusion_attention(
            query.reshape(sq, b, hq * d), key.reshape(sk, b, -1), value.reshape(sk, b, -1), hq, "SBH",
            scale=self.softmax_scale, keep_prob=self._keep_prob(), **kw)[0]
        return out  # [sq, b, hq * d]

    def _attend_packed(self, query, key, value, mask_type, params):
        import torch_npu

        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        ends_q, ends_kv = tnd_lengths(cu_q, cu_kv)
        kw = {}
        if mask_type == AttnMaskType.causal:
            # per document bottom-right: the same as top-left when a document's queries are its keys
            kw = dict(atten_mask=_compressed_mask(query.device), sparse_mode=SPARSE_CAUSAL_BOTTOM_RIGHT)
        elif mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise NotImplementedError(f"packed (thd) attention with mask type {mask_type}")
        out = torch_npu.npu_fusion_attention(
            query, key, value, query.shape[1], "TND", scale=self.softmax_scale, keep_prob=self._keep_prob(),
            actual_seq_qlen=ends_q, actual_seq_kvlen=ends_kv, **kw)[0]
        return out.reshape(out.shape[0], -1)  # [t, hq * d]


class NPUContextParallelAttention(ContextParallelAttention):
    """ContextParallelAttention whose ring steps run npu_fusion_attention and its gradient kernel."""

    block_forward = staticmethod(npu_block_forward_)
    block_backward = staticmethod(npu_block_backward_)
