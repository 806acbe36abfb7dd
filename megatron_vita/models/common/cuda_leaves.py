"""CUDA leaf classes: core attention through flash-attn (`--use-flash-attn` on `--backend cuda`).

`models.common.leaves.select_leaves` picks `FlashAttention` for the LLM (at CP 1; under context
parallelism the CP leaf keeps the LLM) and for the ViT when the active platform is cuda and its
features hold `use-flash-attn`; the default stays the plain torch SDPA leaf (`CoreAttention`).
Whether the flag may be given (flash_attn importable, fp16/bf16 compute) is checked before any
rank starts (`platform.features.feature_problems`).

The glue follows flash-attn 2's documented contract (flash_attn_interface, >= 2.1):
  flash_attn_func(q, k, v, dropout_p, softmax_scale, causal)
      q [b, s_q, h_q, d], k / v [b, s_k, h_kv, d] (h_q a multiple of h_kv: GQA without repeating
      KV), last dimension contiguous, fp16 / bf16, d <= 256; returns [b, s_q, h_q, d].
  flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
      packed q [total_q, h_q, d]; cu_seqlens int32 [documents + 1] WITH the leading 0
      (megatron's cu_seqlens as they are); max_seqlen a Python int.
  causal=True with s_q < s_k aligns the mask to the BOTTOM-RIGHT corner (since 2.1): query i
  attends keys <= i + s_k - s_q, which is KV-cache decoding's rule, the same as CoreAttention's.
megatron hands the leaf [s, b, h, d] (sbhd) or [t, h, d] (thd): sbhd is transposed to bshd.
flash-attn takes no arbitrary mask: an explicit padding / arbitrary mask goes to the SDPA path.
Nothing here was run on a GPU: the tests check this glue against an emulation of that contract.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_vita.models.common.attention import CoreAttention

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _flash_attn():
    """The flash_attn module, or one line saying why it is unusable."""
    try:
        return importlib.import_module("flash_attn")
    except Exception as e:  # a wheel built for another torch / CUDA fails in many ways
        raise RuntimeError(f"--use-flash-attn: flash_attn does not import ({type(e).__name__}: {e}); "
                           "pip install 'megatron-vita[gpu]' or drop the flag") from e


class FlashAttention(CoreAttention):
    """CoreAttention whose attention runs in flash-attn's kernels (same constructor and forward)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._flash = _flash_attn()

    def attend(self, query, key, value, attention_mask, mask_type: AttnMaskType,
               packed_seq_params: Optional[PackedSeqParams]) -> torch.Tensor:
        if attention_mask is not None and mask_type in (AttnMaskType.padding, AttnMaskType.arbitrary):
            return super().attend(query, key, value, attention_mask, mask_type, packed_seq_params)
        if query.dtype not in FLASH_DTYPES:
            raise RuntimeError(f"--use-flash-attn: flash-attn computes in fp16/bf16, got {query.dtype} "
                               "(train with --bf16, verify with --dtype bf16)")
        causal = mask_type == AttnMaskType.causal
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, causal, dropout, packed_seq_params)
        q, k, v = (t.transpose(0, 1).contiguous() for t in (query, key, value))  # sbhd -> bshd
        out = self._flash.flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=self.softmax_scale,
                                          causal=causal)
        out = out.transpose(0, 1)  # [s, b, h, d]
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _packed(self, query, key, value, causal, dropout, params: PackedSeqParams) -> torch.Tensor:
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
        max_k = int((cu_k[1:] - cu_k[:-1]).max()) if cu_k.numel() > 1 else 0
        out = self._flash.flash_attn_varlen_func(
            query.contiguous(), key.contiguous(), value.contiguous(), cu_q, cu_k, max_q, max_k,
            dropout_p=dropout, softmax_scale=self.softmax_scale, causal=causal)
        return out.reshape(out.shape[0], -1)
