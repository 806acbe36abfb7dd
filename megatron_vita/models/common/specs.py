"""The one layer-spec shape both Long-VITA transformers use (pre-norm self-attention + MLP).

The ViT and the LLM differ in the layer class (layer scale), the attention mask and the leaves;
the wiring is the same, so it is written once. Leaves (core_attention, norm) are the swap points
for backends (NPU kernels via mindspeed_patches) and context-parallel attention.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules


# megatron's own fusion switches need TransformerEngine/apex kernels; this stack swaps kernels
# through spec leaves and mindspeed_patches instead, so both transformers start from plain ops.
# Long-VITA trains without dropout.
PLAIN_OPS = dict(
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
)


def pre_norm_layer_spec(layer_cls, attn_mask_type: AttnMaskType, core_attention, norm) -> ModuleSpec:
    """norm -> self-attention (fused QKV column-parallel, row-parallel proj) -> add -> norm -> MLP -> add."""
    return ModuleSpec(
        module=layer_cls,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
