"""The NPU features mindspeed_patches knows, in the order they register their patches.

Each is a class named after its MindSpeed flag, whose patched code imports torch_npu only when
it runs (so this package imports neither torch nor torch_npu):
  --use-fused-rmsnorm         npu_rms_norm in the RMSNorm leaf's forward   (features/rms_norm.py)
  --use-fused-swiglu          npu_swiglu for megatron's gated SiLU         (features/swiglu.py)
  --use-fused-rotary-pos-emb  npu_rotary_mul for RoPE, dense and packed    (features/rotary.py)
  --use-flash-attn            npu_fusion_attention in the attention leaves (features/flash_attention.py)
Order matters only for wrappers of the same target: a later feature's wrapper sits outside an
earlier one's.

Not a feature: torch_npu's fused AdamW. MindSpeed selects it with `--optimizer-selection`
(its own compiled kernel, npu_apply_fused_adamw_v2), not a `--use-fused-adamw` flag, and
neither it nor `torch_npu.optim.NpuFusedAdamW` documents the rounding of its update: its
agreement with torch.optim.AdamW (what megatron builds without apex / TransformerEngine, and
what the bit-exact resume tests hold) cannot be established off an NPU.
"""
from typing import List, Type

from mindspeed_patches.features.base import Feature, FeatureArgumentError, FeatureManager, flag_dest, flag_enabled
from mindspeed_patches.features.flash_attention import FlashAttentionFeature
from mindspeed_patches.features.rms_norm import FusedRMSNorm
from mindspeed_patches.features.rotary import FusedRotaryPosEmb
from mindspeed_patches.features.swiglu import FusedSwiGLU

FEATURES: List[Type[Feature]] = [FusedRMSNorm, FusedSwiGLU, FusedRotaryPosEmb, FlashAttentionFeature]

__all__ = ["FEATURES", "Feature", "FeatureArgumentError", "FeatureManager", "flag_dest", "flag_enabled",
           "FlashAttentionFeature", "FusedRMSNorm", "FusedRotaryPosEmb", "FusedSwiGLU"]
