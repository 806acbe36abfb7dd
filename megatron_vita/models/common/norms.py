"""Normalisation leaves (LayerNorm, RMSNorm) for megatron-core layer specs, sequence-parallel aware.

megatron-core's own torch norm (WrappedTorchNorm) refuses sequence parallelism: with SP each
tensor-parallel rank normalises a different slice of the sequence, so the norm weights' grads
must be summed over the TP group. megatron's finalize_model_grads does that for parameters
tagged `sequence_parallel = True`; these leaves tag their parameters from the config. Model code
only ever names these classes. On the NPU, `--use-fused-rmsnorm` (mindspeed_patches/features/
rms_norm.py) replaces RMSNorm.forward with torch_npu.npu_rms_norm, so every instance takes the
kernel, the LLM's final norm included; its fp32 math equals `forward` here bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def tag_sequence_parallel(module: torch.nn.Module, enabled: bool) -> None:
    """Mark `module`'s parameters as computed on sequence-parallel activations."""
    for p in module.parameters():
        p.sequence_parallel = enabled


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like Qwen2's RMSNorm."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        tag_sequence_parallel(self, config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(dtype)


class LayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm with megatron's norm constructor signature."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        tag_sequence_parallel(self, config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
