"""Vision-to-language bridge: pixel shuffle (ratio 0.5) and the MLP projector.

ViT tokens [n, 1+P, C] -> drop CLS -> [n, g, g, C] -> pixel shuffle -> [n, g/2, g/2, 4C]
-> LayerNorm(4C) -> Linear(4C -> F, no bias) -> GELU -> Linear(F -> H_llm, no bias), with F the
ViT width in Long-VITA (InternVL uses the LLM width and biases). The two linears are
column- then row-parallel over the tensor-parallel group; the output is replicated on every
TP rank, ready to be written into the (not yet sequence-scattered) token embeddings.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vita.config.model import ModelConfig
from megatron_vita.models.common.norms import LayerNorm
from megatron_vita.models.common.visual_tokens import pixel_shuffle


class VisionProjector(MegatronModule):
    """ViT hidden states (with CLS) -> LLM-width features [n_tiles, tokens_per_tile, H_llm]."""

    def __init__(self, config: TransformerConfig, model: ModelConfig):
        super().__init__(config=config)
        self.ratio = model.projector.downsample_ratio
        in_size, mid = model.projector_input_size, model.projector.ffn_hidden_size
        self.layernorm = LayerNorm(config, in_size, eps=model.projector.layernorm_epsilon)
        self.linear_fc1 = ColumnParallelLinear(
            in_size, mid, config=config, init_method=config.init_method, bias=False, gather_output=False,
            skip_bias_add=True,
        )
        self.linear_fc2 = RowParallelLinear(
            mid, model.language.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True,
        )

    def forward(self, vit_hidden: torch.Tensor) -> torch.Tensor:
        tokens = vit_hidden[:, 1:]  # drop CLS
        n, p, c = tokens.shape
        g = math.isqrt(p)
        if g * g != p:
            raise ValueError(f"ViT produced {p} patch tokens per tile, not a square grid")
        x = pixel_shuffle(tokens.reshape(n, g, g, c), self.ratio)
        x = x.reshape(n, -1, x.shape[-1])  # [n, T, 4C]
        x = self.layernorm(x)
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x
