"""InternViT-300M on megatron-core: layer spec, layer-scaled transformer layer, and the encoder.

The ViT is a megatron TransformerBlock built from a ModuleSpec, so tensor parallelism and
kernel swaps (spec leaves) work as in the LLM. What InternViT adds to a stock pre-norm layer is
layer scale: x = x + ls1 * attn(LN1(x)); x = x + ls2 * mlp(LN2(x)). It is expressed through
the layer's bias-dropout-add step, so megatron's layer forward (recompute, hooks) is reused as
is. Attention is bidirectional; there is no final norm. The encoder owns the patch conv, CLS
token and learned absolute position embedding (bicubic-interpolated for other image sizes).
The ViT follows the LLM's tensor parallelism but never uses sequence parallelism (its 1025-token
sequences are short and rarely divisible by TP), and it lives on the first pipeline stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_vita.config.model import VisionConfig
from megatron_vita.models.common.attention import CoreAttention
from megatron_vita.models.common.norms import LayerNorm
from megatron_vita.models.common.specs import PLAIN_OPS, pre_norm_layer_spec


def _layer_scaled_bda(layer: torch.nn.Module, scale_name: str):
    """Megatron's bias-dropout-add with the branch output scaled per channel before the add.

    The scale is looked up on the layer at call time, so parameter rebinding (DDP buffers,
    dtype casts, loading) is always seen.
    """

    def make(training: bool, fused: bool):
        def bda(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            x = F.dropout(x, p=prob, training=training)
            return residual + getattr(layer, scale_name) * x

        return bda

    return make


class InternViTLayer(TransformerLayer):
    """Pre-norm transformer layer with InternViT's per-channel layer scale `ls1` / `ls2`."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int = 1,
                 hidden_dropout=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout)
        # InternViT initialises layer scale to 0.1 (its initializer_factor): an untrained block then
        # perturbs the patch features instead of replacing them.
        self.ls1 = torch.nn.Parameter(torch.full((config.hidden_size,), 0.1, dtype=config.params_dtype))
        self.ls2 = torch.nn.Parameter(torch.full((config.hidden_size,), 0.1, dtype=config.params_dtype))
        self.self_attn_bda = _layer_scaled_bda(self, "ls1")
        self.mlp_bda = _layer_scaled_bda(self, "ls2")


def vit_layer_spec(core_attention=CoreAttention, norm=LayerNorm) -> ModuleSpec:
    """InternViT layer: bidirectional attention, LayerNorm, layer scale."""
    return pre_norm_layer_spec(InternViTLayer, AttnMaskType.no_mask, core_attention, norm)


def vision_transformer_config(vision: VisionConfig, language_tc: TransformerConfig) -> TransformerConfig:
    """The ViT's TransformerConfig: its own sizes, the LLM's TP, dtype and recompute settings."""
    act = {"gelu": F.gelu}.get(vision.hidden_act)
    if act is None:
        raise ValueError(f"vision hidden_act {vision.hidden_act!r} is not supported (InternViT uses exact 'gelu')")
    return TransformerConfig(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.ffn_hidden_size,
        num_attention_heads=vision.num_attention_heads,
        kv_channels=vision.kv_channels,
        tensor_model_parallel_size=language_tc.tensor_model_parallel_size,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        normalization="LayerNorm",
        layernorm_epsilon=vision.layernorm_epsilon,
        activation_func=act,
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=vision.qkv_bias,
        **PLAIN_OPS,
        use_cpu_initialization=language_tc.use_cpu_initialization,
        params_dtype=language_tc.params_dtype,
        bf16=language_tc.bf16,
        fp16=language_tc.fp16,
        init_method_std=language_tc.init_method_std,
        recompute_granularity=language_tc.recompute_granularity,
        recompute_method=language_tc.recompute_method,
        recompute_num_layers=language_tc.recompute_num_layers if language_tc.recompute_method else None,
    )


class InternViTModel(MegatronModule):
    """pixels [n, 3, H, W] -> hidden states [n, 1 + (H/p)(W/p), C] (CLS first, no final norm)."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig, layer_spec: ModuleSpec = None):
        super().__init__(config=config)
        self.vision = vision
        c = vision.hidden_size
        self.conv1 = torch.nn.Conv2d(vision.num_channels, c, kernel_size=vision.patch_size, stride=vision.patch_size,
                                     bias=True, dtype=config.params_dtype)
        self.class_token = torch.nn.Parameter(torch.zeros(1, 1, c, dtype=config.params_dtype))
        self.position_embeddings = torch.nn.Embedding(vision.seq_length, c, dtype=config.params_dtype)
        # Same small normal init as the linears (nn.Embedding's default N(0, 1) would drown the
        # patch features of an untrained tower in position signal).
        config.init_method(self.position_embeddings.weight)
        config.init_method(self.class_token)
        spec = layer_spec or vit_layer_spec()
        self.decoder = TransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(layer_specs=[spec] * vision.num_layers, layer_norm=None),
            pre_process=True,
            post_process=False,
        )

    def position_embedding_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1 + grid_h*grid_w, C]; bicubic interpolation of the patch part when the grid differs."""
        pos = self.position_embeddings.weight
        g = self.vision.grid_size
        if (grid_h, grid_w) == (g, g):
            return pos
        patch = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
        return torch.cat([pos[:1], patch], dim=0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [n, C, gh, gw]
        n, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # [n, gh*gw, C]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = x + self.position_embedding_for(gh, gw).unsqueeze(0)
        x = x.transpose(0, 1).contiguous()  # megatron layout [s, b, h]
        x = self.decoder(hidden_states=x, attention_mask=None)
        return x.transpose(0, 1)
