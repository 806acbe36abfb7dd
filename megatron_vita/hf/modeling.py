"""Long-VITA as transformers models: InternViT + pixel-shuffle MLP projector + Qwen2.

Owns the HF forward of the whole model: visual features (ViT without CLS -> pixel shuffle ->
projector) are written into the token embeddings at the context-token positions, then
transformers' own Qwen2 decoder runs. Parameter names are the released ones
(`model.vision_model.*`, `model.vision_projection.*`, Qwen2 names for the LLM), and `forward`
keeps the released argument names (`images`, `image_indices`, `past_key_values`).
Pixel shuffle and where a tile's features go when `image_indices` is not given
(`context_token_indices`) are the convention shared with the Megatron model
(models/common/visual_tokens).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel
from transformers.utils import can_return_tuple

from megatron_vita.hf.configuration import LongVITAConfig
from megatron_vita.hf.vision import InternVisionModel
from megatron_vita.models.common.visual_tokens import context_token_indices, pixel_shuffle


class LongVITAProjector(nn.Module):
    """LayerNorm(4 C_vit) -> Linear(no bias) -> GELU -> Linear(no bias) to the LLM width."""

    def __init__(self, config: LongVITAConfig):
        super().__init__()
        in_size = int(config.visual.hidden_size / config.downsample_ratio ** 2)
        self.pre_proj_layernorm = nn.LayerNorm(in_size, eps=config.projector_layernorm_eps)
        # Index names mlp.0 / mlp.2 are the released parameter names.
        self.mlp = nn.Sequential(
            nn.Linear(in_size, config.projector_hidden_size, bias=False),
            nn.GELU(),
            nn.Linear(config.projector_hidden_size, config.hidden_size, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pre_proj_layernorm(x))


def _pick_cache(past_key_values: Optional[Cache], kwargs: dict) -> Optional[Cache]:
    # transformers 5 passes the cache as `cache` (generate does); released callers use
    # `past_key_values`. Both name the same thing; giving two different ones is a bug.
    cache = kwargs.pop("cache", None)
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache as either `past_key_values` or `cache`, not both")
    return past_key_values if past_key_values is not None else cache


class LongVITAPreTrainedModel(Qwen2PreTrainedModel):
    config_class = LongVITAConfig
    config: LongVITAConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text", "video")
    _no_split_modules = ["Qwen2DecoderLayer", "InternVisionEncoderLayer"]
    # Long-VITA's LM head is never tied to the embeddings.
    _tied_weights_keys = None


class LongVITAModel(LongVITAPreTrainedModel, Qwen2Model):
    """Qwen2Model plus `vision_model` (InternViT) and `vision_projection` (the projector)."""

    def __init__(self, config: LongVITAConfig):
        super().__init__(config)
        self.vision_model = InternVisionModel(config.visual)
        self.vision_projection = LongVITAProjector(config)
        # Qwen2Model.__init__ already ran post_init for the language part; this one initialises
        # the modules added above (initialised modules are skipped) and registers them.
        self.post_init()

    def tokens_per_tile(self, images: torch.Tensor) -> int:
        """Feature tokens one tile of `images` ([n, 3, H, W]) gives after pixel shuffle."""
        patch = self.config.visual.patch_size
        return int((images.shape[-2] // patch) * (images.shape[-1] // patch) * self.config.downsample_ratio ** 2)

    def get_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tiles [n, 3, H, W] -> projected features [n, (H/p)(W/p) r^2, llm_hidden]."""
        images = images.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        vit = self.vision_model(images).last_hidden_state[:, 1:]  # drop CLS
        patch = self.config.visual.patch_size
        gh, gw = images.shape[-2] // patch, images.shape[-1] // patch
        x = pixel_shuffle(vit.reshape(vit.shape[0], gh, gw, vit.shape[-1]), self.config.downsample_ratio)
        return self.vision_projection(x.reshape(x.shape[0], -1, x.shape[-1]))

    def merge_image_features(self, inputs_embeds: torch.Tensor, images: torch.Tensor,
                             image_indices: Optional[torch.Tensor],
                             input_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Write the features of `images` into `inputs_embeds` at `image_indices` (derived if None)."""
        # Check the positions before running the ViT: a mismatch should fail fast.
        n_tiles, per_tile = images.shape[0], self.tokens_per_tile(images)
        if image_indices is None:
            if input_ids is None:
                raise ValueError("images without image_indices need input_ids to find the context tokens")
            image_indices = context_token_indices(input_ids, self.config.context_token_ids, per_tile, n_tiles)
        elif tuple(image_indices.shape) != (2, n_tiles, per_tile):
            raise ValueError(f"image_indices has shape {tuple(image_indices.shape)}, expected "
                             f"[2, n_tiles={n_tiles}, tokens_per_tile={per_tile}] for images "
                             f"{tuple(images.shape)}")
        image_indices = image_indices.to(inputs_embeds.device)
        features = self.get_image_features(images)
        # Out-of-place so that gradients reach both the text embeddings and the projector.
        return inputs_embeds.index_put(
            (image_indices[0].reshape(-1), image_indices[1].reshape(-1)),
            features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype),
        )

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        images: Optional[torch.Tensor] = None,
        image_indices: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = _pick_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if images is not None:
            inputs_embeds = self.merge_image_features(inputs_embeds, images, image_indices, input_ids)
        return super().forward(input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)


class LongVITAForCausalLM(LongVITAPreTrainedModel, GenerationMixin):
    """Long-VITA with its (untied) LM head; `generate` takes `images` with the prompt."""

    def __init__(self, config: LongVITAConfig):
        super().__init__(config)
        self.model = LongVITAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(images)

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        images: Optional[torch.Tensor] = None,
        image_indices: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`images`: tiles [n_tiles, 3, H, W] (image tiles and video frames, in prompt order);
        `image_indices`: [2, n_tiles, tokens_per_tile] (batch index, position) of each feature
        token, derived from the context tokens of `input_ids` when None. `labels` are unshifted
        (the loss shifts them, positions with -100 are ignored)."""
        cache = _pick_cache(past_key_values, kwargs)
        outputs = self.model(
            input_ids=input_ids, images=images, image_indices=image_indices, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def generate(self, inputs: Optional[torch.Tensor] = None, *args, images: Optional[torch.Tensor] = None,
                 image_indices: Optional[torch.LongTensor] = None, **kwargs):
        """GenerationMixin.generate plus `images` / `image_indices` for the prompt.

        The feature positions are fixed from the prompt here: generated tokens are never
        visual slots, even if a (badly trained) model emits a context-token id.
        """
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if images is not None and image_indices is None and prompt is not None:
            image_indices = context_token_indices(prompt, self.config.context_token_ids,
                                                  self.model.tokens_per_tile(images), images.shape[0])
        return super().generate(inputs, *args, images=images, image_indices=image_indices, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: Optional[int] = None,
                                      cache: Optional[Cache] = None, attention_mask: Optional[torch.Tensor] = None,
                                      inputs_embeds: Optional[torch.Tensor] = None,
                                      images: Optional[torch.Tensor] = None,
                                      image_indices: Optional[torch.LongTensor] = None,
                                      is_first_iteration: Optional[bool] = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
        )
        # With a KV cache the visual features live in the cache after prefill; later steps see
        # only new tokens and must not get the images again. Without a cache every step re-runs
        # the whole prompt, so it needs them every time.
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["images"] = images
            model_inputs["image_indices"] = image_indices
        return model_inputs

