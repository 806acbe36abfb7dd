"""Core attention leaf: softmax(QK^T * scale + mask) V for megatron-core's `core_attention` slot.

One leaf serves every Long-VITA attention: the ViT's bidirectional attention, the LLM's causal
GQA attention, packed documents (megatron's `thd` format with cu_seqlens: no document attends
across a boundary), and KV-cache decoding (fewer queries than keys: the causal mask is aligned
to the bottom-right). It is plain torch (scaled_dot_product_attention), so it runs on every
backend; fused kernels (npu_fusion_attention, TE) and context-parallel attention replace this
class in the layer specs, never the model code.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class CoreAttention(MegatronModule):
    """Drop-in for megatron's DotProductAttention (same constructor and forward signature)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q, k, v, causal: bool, mask: Optional[torch.Tensor]):
        """q [b, hq, sq, d]; k, v [b, hkv, sk, d] -> [b, hq, sq, d]."""
        sq, sk = q.shape[-2], k.shape[-2]
        if causal and sq != sk:
            # Queries are the last sq positions of a longer key sequence (KV cache).
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
            causal = False
        elif mask is not None:
            mask = ~mask  # megatron: True = masked out; SDPA: True = attend
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=q.shape[1] != k.shape[1],
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError(f"{type(self).__name__} does not take an attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return self.attend(query, key, value, attention_mask, mask_type, packed_seq_params)

    def attend(self, query, key, value, attention_mask, mask_type: AttnMaskType,
               packed_seq_params: Optional[PackedSeqParams]) -> torch.Tensor:
        """The attention itself (subclasses for other algorithms override this, not forward)."""
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(query, key, value, causal, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = attention_mask if mask_type in (AttnMaskType.padding, AttnMaskType.arbitrary) else None
        out = self._sdpa(q, k, v, causal, mask)
        out = out.permute(2, 0, 1, 3)  # [s, b, h, d]
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _forward_packed(self, query, key, value, causal, params: PackedSeqParams) -> torch.Tensor:
        """`thd`: query [t, h, d]; one attention per document delimited by cu_seqlens."""
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        outs = []
        for i in range(len(bounds_q) - 1):
            q = query[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1).unsqueeze(0)
            k = key[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1).unsqueeze(0)
            v = value[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1).unsqueeze(0)
            if q.shape[-2] == 0:
                continue
            outs.append(self._sdpa(q, k, v, causal, None)[0].transpose(0, 1))
        out = torch.cat(outs, dim=0)  # [t, h, d]
        return out.reshape(out.shape[0], -1)
