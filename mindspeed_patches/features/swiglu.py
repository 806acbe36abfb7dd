"""`--use-fused-swiglu`: the gated SiLU of megatron's MLP through `torch_npu.npu_swiglu`.

megatron-core 0.12.1 has no leaf for the activation: `MLP.forward` either applies a local
`glu` closure (config.bias_activation_fusion False) or calls
`megatron.core.fusions.fused_bias_swiglu.bias_swiglu_impl` (True). The closure cannot be
reached, so this feature, like MindSpeed (whose `--use-fused-swiglu` rides on Megatron-LM's
default `--bias-swiglu-fusion`), takes the second path:

* every TransformerConfig with a gated SiLU (`gated_linear_unit` and `F.silu`: the LLM's MLP,
  not the ViT's GELU) gets `bias_activation_fusion = True` once its own checks have run;
* `bias_swiglu_impl` is replaced by a call of npu_swiglu (bias added first when there is one).
  fc1's output rows are [gate; up] on each TP rank, so the first half along the last dim is the
  gate: exactly npu_swiglu(x, dim=-1).
The registry also repoints `megatron.core.transformer.mlp`'s `from ... import` copy.
"""
from __future__ import annotations

import functools

from mindspeed_patches.features.base import Feature
from mindspeed_patches.registry import PatchRegistry

IMPL_TARGET = "megatron.core.fusions.fused_bias_swiglu.bias_swiglu_impl"
CONFIG_TARGET = "megatron.core.transformer.transformer_config.TransformerConfig.__post_init__"


def npu_bias_swiglu_impl(input, bias, fp8_input_store=False):
    """megatron's bias_swiglu_impl on the NPU kernel: silu(gate) * up of (input + bias)."""
    import torch_npu

    if fp8_input_store:
        # megatron would keep the input in fp8 for backward; the NPU kernel has no such mode.
        raise ValueError("--use-fused-swiglu: activation_func_fp8_input_store is not supported by npu_swiglu")
    if bias is not None:
        input = input + bias
    return torch_npu.npu_swiglu(input, dim=-1)


def gated_silu_fusion_wrapper(post_init):
    """TransformerConfig.__post_init__, then the fused-activation path for gated-SiLU configs."""

    @functools.wraps(post_init)
    def post_init_with_fused_swiglu(self):
        import torch.nn.functional as F

        post_init(self)
        if self.gated_linear_unit and self.activation_func is F.silu:
            self.bias_activation_fusion = True

    return post_init_with_fused_swiglu


class FusedSwiGLU(Feature):
    name = "use-fused-swiglu"
    help = "the MLP's gated SiLU (SwiGLU) through torch_npu.npu_swiglu"

    def register_patches(self, registry: PatchRegistry, args) -> None:
        registry.register_patch(IMPL_TARGET, npu_bias_swiglu_impl,
                                reason="--use-fused-swiglu: megatron's fused SwiGLU runs torch_npu.npu_swiglu")
        registry.register_patch(CONFIG_TARGET, gated_silu_fusion_wrapper,
                                reason="--use-fused-swiglu: gated-SiLU MLPs take the fused-activation path "
                                       "(bias_activation_fusion), the only one megatron's MLP lets a kernel into")
