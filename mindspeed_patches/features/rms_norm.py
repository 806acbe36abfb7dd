"""`--use-fused-rmsnorm`: the LLM's RMSNorm through `torch_npu.npu_rms_norm`.

megatron-core has a leaf for the norm: the layer specs build every LLM norm (both norms of each
layer and the final norm) from `megatron_vita.models.common.norms.RMSNorm`. This feature
replaces that leaf's forward, as MindSpeed replaces the forward of megatron's RMSNorm, so every
instance (the final norm included, whichever spec built it) takes the kernel. The ViT's
LayerNorm is untouched.

npu_rms_norm(x, gamma, epsilon) normalises over gamma's dims in fp32 and returns (y, rstd);
the leaf keeps y. Its contract wants gamma in x's dtype, which megatron's mixed precision gives
(parameters and activations are both cast to bf16 / fp16).
"""
from __future__ import annotations

from mindspeed_patches.features.base import Feature
from mindspeed_patches.registry import PatchRegistry

TARGET = "megatron_vita.models.common.norms.RMSNorm.forward"


def npu_rms_norm_forward(self, x):
    """RMSNorm.forward on the NPU kernel (torch_npu is imported when the norm runs)."""
    import torch_npu

    return torch_npu.npu_rms_norm(x, self.weight, epsilon=self.eps)[0]


class FusedRMSNorm(Feature):
    name = "use-fused-rmsnorm"
    help = "RMSNorm through torch_npu.npu_rms_norm (the LLM's norm leaf)"

    def register_patches(self, registry: PatchRegistry, args) -> None:
        registry.register_patch(TARGET, npu_rms_norm_forward,
                                reason="--use-fused-rmsnorm: the RMSNorm leaf runs torch_npu.npu_rms_norm")
