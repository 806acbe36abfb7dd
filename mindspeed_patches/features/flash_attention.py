"""`--use-flash-attn`: every core attention through `torch_npu.npu_fusion_attention`.

Owns the feature and its patch: it wraps `megatron_vita.models.common.leaves.select_leaves`, so
a model built afterwards gets the leaves of features/npu_attention.py (which hold the glue to the
kernel's contract, shared/reference/npu.md):
  CoreAttention               -> NPUCoreAttention (the LLM at CP 1, and the ViT at every CP)
  ContextParallelAttention    -> NPUContextParallelAttention (the LLM under CP)
and model code names no kernel. How each case maps onto the kernel:
  LLM causal (sbhd)          SBH ([s, b, h*d] is megatron's layout), sparse_mode 2 (top-left causal)
                             with the compressed 2048 x 2048 triu(ones, 1) mask.
  KV-cache decoding          fewer queries than keys, the queries being the LAST positions:
                             sparse_mode 3 (bottom-right causal), the same compressed mask.
  ViT (no mask)              SBH, sparse_mode 0, no mask.
  padding / arbitrary mask   SBH, sparse_mode 0, megatron's mask as is (both use True = masked out).
  packed documents (thd)     TND with actual_seq_qlen / actual_seq_kvlen = megatron's cu_seqlens
                             (the padded ones when given, as CoreAttention uses) WITHOUT the
                             leading 0 and without empty documents; causal is sparse_mode 3.
  ring / Ulysses CP          each forward step's block (per document: the diagonal block causal
                             with sparse_mode 2, the others unmasked) runs in BNSD through the
                             kernel; its softmax_max / softmax_sum (column 0 of the trailing 8)
                             give the block's lse = m + log(l), merged with blocks.merge_. Each
                             backward step's block runs npu_fusion_attention_grad with the FINAL
                             statistics (softmax_max = lse, softmax_sum = 1) and output
                             (attention_in), the same masks; the ring carries dK / dV home.
Every call passes scale = the layer's softmax scale (the kernel's default is 1.0) and
keep_prob = 1 - attention dropout while training. This module imports neither torch nor
megatron; `torch_npu` is imported at call time, so the test emulation (tests/emulation/torch_npu)
answers on CPU.
"""
from __future__ import annotations

import dataclasses
import functools

from mindspeed_patches.features.base import Feature

SELECT_LEAVES = "megatron_vita.models.common.leaves.select_leaves"


def select_leaves_wrapper(select_leaves):
    """Swap the attention leaves select_leaves picks for their npu_fusion_attention versions."""

    @functools.wraps(select_leaves)
    def select_npu_leaves(par, backend=None):
        from megatron_vita.models.common.attention import CoreAttention
        from megatron_vita.parallel.context.leaf import ContextParallelAttention

        from mindspeed_patches.features.npu_attention import NPUContextParallelAttention, NPUCoreAttention

        leaves = select_leaves(par, backend)
        swap = {CoreAttention: NPUCoreAttention, ContextParallelAttention: NPUContextParallelAttention,
                NPUCoreAttention: NPUCoreAttention, NPUContextParallelAttention: NPUContextParallelAttention}
        for field in ("language_attention", "vision_attention"):
            chosen = getattr(leaves, field)
            if chosen not in swap:
                raise RuntimeError(f"--use-flash-attn: no npu_fusion_attention version of the {field} leaf "
                                   f"{chosen.__module__}.{chosen.__qualname__}")
        return dataclasses.replace(leaves, language_attention=swap[leaves.language_attention],
                                   vision_attention=swap[leaves.vision_attention])

    return select_npu_leaves


class FlashAttentionFeature(Feature):
    """MindSpeed's --use-flash-attn: core attention through torch_npu.npu_fusion_attention."""

    name = "use-flash-attn"
    help = ("core attention (LLM, ViT, packed documents, KV-cache decoding, context-parallel ring steps) "
            "through torch_npu.npu_fusion_attention")

    def register_patches(self, registry, args) -> None:
        registry.register_patch(SELECT_LEAVES, select_leaves_wrapper,
                                reason="attention leaves backed by torch_npu.npu_fusion_attention")
