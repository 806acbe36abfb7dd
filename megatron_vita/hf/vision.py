"""InternViT-300M as a transformers model, with the released Long-VITA parameter names.

Owns the vision encoder of the HF model: patch embedding + CLS + learned absolute positions
(bicubically resized for other image sizes), pre-norm layers with per-channel layer scale,
bidirectional attention through torch SDPA, no final norm. Parameter names follow the
released checkpoints (`embeddings.class_embedding`, `encoder.layers.N.attn.qkv`, `ls1`, ...)
so a released state dict loads without renaming.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from megatron_vita.hf.configuration import InternVisionConfig

# InternViT initialises its layer scales to this value.
LAYER_SCALE_INIT = 0.1


class InternVisionEmbeddings(nn.Module):
    """Conv patch embedding, a prepended CLS token and learned absolute positions."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        c = config.hidden_size
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(config.num_channels, c, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=True)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid_size ** 2 + 1, c))

    def position_embeddings_for(self, height: int, width: int) -> torch.Tensor:
        """Positions for an image of `height` x `width` pixels: [1, 1 + (H/p)(W/p), C].

        At the trained size they are used as stored; otherwise the patch positions are resized
        bicubically (align_corners=False), the CLS position is kept. The resize runs in fp32
        because bicubic weights overshoot and bf16 rounding would shift every position.
        """
        gh, gw = height // self.patch_size, width // self.patch_size
        if gh == self.grid_size and gw == self.grid_size:
            return self.position_embedding
        cls_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        c = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, self.grid_size, self.grid_size, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, c).to(cls_pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, _, height, width = pixel_values.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, (H/p)(W/p), C], row-major over the grid
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1)
        return x + self.position_embeddings_for(height, width).to(x.dtype)


class InternAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv ([all Q; all K; all V] rows)."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=False)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(GradientCheckpointingLayer):
    """x = x + ls1 * attn(norm1(x)); x = x + ls2 * mlp(norm2(x))."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        c = config.hidden_size
        self.norm1 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.ls1 = nn.Parameter(torch.full((c,), LAYER_SCALE_INIT))
        self.norm2 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.mlp = InternMLP(config)
        self.ls2 = nn.Parameter(torch.full((c,), LAYER_SCALE_INIT))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.ls1 * self.attn(self.norm1(hidden_states))
        return hidden_states + self.ls2 * self.mlp(self.norm2(hidden_states))


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor,
                output_hidden_states: bool = False) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]:
        all_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_states = all_states + (hidden_states,)
        return hidden_states, all_states


class InternVisionPreTrainedModel(PreTrainedModel):
    config_class = InternVisionConfig
    config: InternVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, InternVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=std)
            init.normal_(module.position_embedding, mean=0.0, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            init.constant_(module.ls1, LAYER_SCALE_INIT)
            init.constant_(module.ls2, LAYER_SCALE_INIT)


class InternVisionModel(InternVisionPreTrainedModel):
    """InternViT: returns the last layer's hidden states, CLS first ([B, 1 + patches, C]).

    There is no final norm (Long-VITA reads the last layer as it is); the caller drops CLS.
    """

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Optional[bool] = None,
                **kwargs) -> BaseModelOutput:
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [n_tiles, channels, height, width], got {tuple(pixel_values.shape)}")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = self.embeddings(pixel_values)
        last, all_states = self.encoder(hidden_states, output_hidden_states=bool(output_hidden_states))
        return BaseModelOutput(last_hidden_state=last, hidden_states=all_states)
