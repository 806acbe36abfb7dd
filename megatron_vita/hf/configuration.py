"""Hugging Face configuration classes for Long-VITA (model_type "long_vita").

Owns the translation between the released `config.json` layout and transformers' config
objects: Qwen2Config fields at the top level, the InternViT config in a `visual` dict, and the
optional keys this project writes (projector sizes, special-token ids). The mapping to the
project's typed `ModelConfig` goes through `ModelConfig.to_hf_dict()/from_hf_dict()` so that
there is one place that knows the key names.
"""
from __future__ import annotations

from typing import Any, Dict

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig, Qwen2Config

from megatron_vita.config.model import (
    QWEN25_FIRST_SPECIAL_ID,
    SPECIAL_TOKENS,
    LanguageConfig,
    ModelConfig,
    ProjectorConfig,
    TokenIds,
    VisionConfig,
)
from megatron_vita.hf import register_model_classes

_LM = LanguageConfig()
_VIT = VisionConfig()
_PROJ = ProjectorConfig()
_TOK = TokenIds()


@strict
class InternVisionConfig(PreTrainedConfig):
    """InternViT-300M as the released `visual` dict describes it (defaults: the 448px model).

    Released `visual` dicts carry more keys (drop_path_rate, use_flash_attn, ...); they are
    kept as plain attributes and ignored by the model.
    """

    # The name InternVL's own remote code gives this config, so released dicts that carry it agree.
    model_type = "intern_vit_6b"
    base_config_key = "visual"

    hidden_size: int = _VIT.hidden_size
    num_hidden_layers: int = _VIT.num_layers
    num_attention_heads: int = _VIT.num_attention_heads
    intermediate_size: int = _VIT.ffn_hidden_size
    image_size: int | list[int] | tuple[int, ...] = _VIT.image_size
    patch_size: int | list[int] | tuple[int, ...] = _VIT.patch_size
    num_channels: int = _VIT.num_channels
    layer_norm_eps: float = _VIT.layernorm_epsilon
    qkv_bias: bool = _VIT.qkv_bias
    qk_normalization: bool = False
    hidden_act: str = _VIT.hidden_act
    norm_type: str = "layer_norm"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Released dicts may give sizes as [h, w]; the model is square-only like InternViT-300M.
        for key in ("image_size", "patch_size"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"visual.{key}={list(value)}: only square sizes are supported")
                setattr(self, key, int(value[0]))
        if self.qk_normalization:
            raise ValueError("visual.qk_normalization=true (InternViT-6B style) is not supported; "
                             "Long-VITA's InternViT-300M has no QK norm")
        if self.norm_type != "layer_norm":
            raise ValueError(f"visual.norm_type={self.norm_type!r} is not supported; expected 'layer_norm'")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"visual.hidden_size {self.hidden_size} is not divisible by "
                             f"visual.num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"visual.image_size {self.image_size} is not a multiple of "
                             f"visual.patch_size {self.patch_size}")
        super().__post_init__(**kwargs)


def _default_special_token_ids() -> Dict[str, int]:
    return {t: QWEN25_FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIAL_TOKENS)}


@strict
class LongVITAConfig(Qwen2Config):
    """Qwen2 language model + InternViT (`visual`) + pixel-shuffle MLP projector.

    Defaults are Long-VITA-14B's. RoPE: like Qwen2Config, pass `rope_theta=` to the constructor
    (or have it in config.json); assigning `config.rope_theta` afterwards does not reach
    `rope_parameters`, which is what the model reads. A config without any RoPE entry gets
    1e6, Long-VITA's base (Qwen2Config would give 10000).
    """

    model_type = "long_vita"
    sub_configs_defaults = {"visual": InternVisionConfig}
    default_theta = _LM.rope_theta

    vocab_size: int = _LM.vocab_size
    hidden_size: int = _LM.hidden_size
    intermediate_size: int = _LM.ffn_hidden_size
    num_hidden_layers: int = _LM.num_layers
    num_attention_heads: int = _LM.num_attention_heads
    num_key_value_heads: int | None = _LM.num_query_groups
    max_position_embeddings: int = _LM.max_position_embeddings
    rms_norm_eps: float = _LM.rms_norm_eps
    bos_token_id: int | None = _TOK.bos_token_id
    eos_token_id: int | list[int] | None = _TOK.eos_token_id
    pad_token_id: int | None = _TOK.pad_token_id

    visual: dict | PreTrainedConfig | None = None
    downsample_ratio: float = _PROJ.downsample_ratio
    projector_layernorm_eps: float = _PROJ.layernorm_epsilon
    # None: the ViT width (Long-VITA's bottleneck), resolved in __post_init__.
    projector_hidden_size: int | None = None
    im_start_token_id: int = _TOK.im_start_token_id
    # name -> id of the 17 added tokens; None: the Qwen2.5 ids (151665..), as in released configs.
    special_token_ids: dict[str, int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        register_model_classes()  # what AutoModel*.from_config / from_pretrained look this config up in
        if self.projector_hidden_size is None:
            self.projector_hidden_size = self.visual.hidden_size
        if self.special_token_ids is None:
            self.special_token_ids = _default_special_token_ids()
        else:
            self.special_token_ids = {str(k): int(v) for k, v in self.special_token_ids.items()}
            missing = [t for t in SPECIAL_TOKENS if t not in self.special_token_ids]
            if missing:
                raise ValueError(f"special_token_ids lacks {missing}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=true is not a Long-VITA layout (its LM head is untied)")

    # ---- derived sizes -----------------------------------------------------------------
    @property
    def context_token_ids(self) -> tuple:
        """<IMG_CONTEXT>, <VID_CONTEXT>, <PATCH_CONTEXT>: the ids whose embeddings visual features replace."""
        s = self.special_token_ids
        return (s["<IMG_CONTEXT>"], s["<VID_CONTEXT>"], s["<PATCH_CONTEXT>"])

    @property
    def num_image_token(self) -> int:
        """Feature tokens per tile after pixel shuffle (256 for 448px, patch 14, ratio 0.5)."""
        grid = self.visual.image_size // self.visual.patch_size
        return int(grid * grid * self.downsample_ratio ** 2)

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        # The released layout keeps rope_theta at the top level (older readers look there);
        # on load, rope_parameters takes priority, so the two cannot disagree.
        rope = out.get("rope_parameters") or {}
        if "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        return out

    # ---- the project's typed config ------------------------------------------------------
    @classmethod
    def from_model_config(cls, mc: ModelConfig, **overrides: Any) -> "LongVITAConfig":
        d = mc.to_hf_dict()
        d.pop("model_type")
        d.update(overrides)
        return cls(**d)

    def to_model_config(self, name: str = "hf") -> ModelConfig:
        return ModelConfig.from_hf_dict(self.to_dict(), name=name)
