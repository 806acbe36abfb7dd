"""Typed model configuration for Long-VITA and its named presets.

Owns the sizes of the three components (InternViT, projector, Qwen2 LLM), the ids of the
special tokens the model itself needs, and the translation to and from the released Hugging
Face `config.json` (model_type "long_vita": Qwen2Config fields plus a `visual` dict).
Nothing here imports megatron-core or transformers: configs are plain data.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

# The 17 added tokens, in the order they are added to the Qwen2.5 tokenizer (ids 151665..151681).
SPECIAL_TOKENS = (
    "<img>", "</img>", "<IMG_CONTEXT>", "<vid>", "</vid>", "<VID_CONTEXT>",
    "<patch>", "</patch>", "<PATCH_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
    "<box>", "</box>", "<image>", "<video>",
)
QWEN25_FIRST_SPECIAL_ID = 151665


@dataclass
class VisionConfig:
    """InternViT-300M-448px: pre-norm ViT with layer scale, CLS token, no final norm."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    layernorm_epsilon: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def seq_length(self) -> int:
        """Patches plus the CLS token."""
        return self.num_patches + 1

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class ProjectorConfig:
    """Pixel shuffle (ratio 0.5) then LayerNorm -> Linear -> GELU -> Linear, no biases."""

    downsample_ratio: float = 0.5
    layernorm_epsilon: float = 1e-5
    # Bottleneck width; Long-VITA uses the ViT width (InternVL would use the LLM width).
    ffn_hidden_size: int = 1024


@dataclass
class LanguageConfig:
    """Qwen2.5 decoder: GQA, QKV bias only, RMSNorm, SwiGLU, RoPE, untied LM head."""

    vocab_size: int = 152064
    hidden_size: int = 5120
    num_layers: int = 48
    num_attention_heads: int = 40
    num_query_groups: int = 8
    ffn_hidden_size: int = 13824
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_position_embeddings: int = 1310720

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TokenIds:
    """Ids of the tokens the model and the chat template need.

    Defaults are the Qwen2.5 ids (special tokens appended after 151664); tiny vocabularies
    carry their own ids so that the whole pipeline works on them unchanged.
    """

    bos_token_id: int = 151643  # <|endoftext|>
    eos_token_id: int = 151645  # <|im_end|>
    pad_token_id: int = 151643
    im_start_token_id: int = 151644
    special: Dict[str, int] = field(
        default_factory=lambda: {t: QWEN25_FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIAL_TOKENS)}
    )

    @property
    def img_context(self) -> int:
        return self.special["<IMG_CONTEXT>"]

    @property
    def vid_context(self) -> int:
        return self.special["<VID_CONTEXT>"]

    @property
    def patch_context(self) -> int:
        return self.special["<PATCH_CONTEXT>"]

    @property
    def context_ids(self) -> tuple:
        """Token ids whose embeddings are overwritten by visual features."""
        return (self.img_context, self.vid_context, self.patch_context)

    @classmethod
    def at_end_of_vocab(cls, vocab_size: int) -> "TokenIds":
        """Place <|endoftext|>, <|im_start|>, <|im_end|> and the 17 specials in the last 20 ids."""
        first = vocab_size - len(SPECIAL_TOKENS) - 3
        return cls(
            bos_token_id=first, eos_token_id=first + 2, pad_token_id=first, im_start_token_id=first + 1,
            special={t: first + 3 + i for i, t in enumerate(SPECIAL_TOKENS)},
        )


@dataclass
class ModelConfig:
    """The whole Long-VITA model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    tokens: TokenIds = field(default_factory=TokenIds)
    name: str = "long-vita-14b"

    @property
    def num_image_token(self) -> int:
        """Feature tokens per tile after pixel shuffle (256 for 448px / patch 14 / ratio 0.5)."""
        return int(self.vision.num_patches * self.projector.downsample_ratio ** 2)

    @property
    def projector_input_size(self) -> int:
        return int(self.vision.hidden_size / self.projector.downsample_ratio ** 2)

    def validate(self) -> "ModelConfig":
        v, p, lm = self.vision, self.projector, self.language
        errors = []
        if v.image_size % v.patch_size:
            errors.append(f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        scale = round(1 / p.downsample_ratio)
        if abs(scale * p.downsample_ratio - 1) > 1e-9 or v.grid_size % scale:
            errors.append(f"vision grid {v.grid_size} is not divisible by 1/downsample_ratio ({1 / p.downsample_ratio})")
        if v.hidden_size % v.num_attention_heads:
            errors.append(f"vision.hidden_size {v.hidden_size} % num_attention_heads {v.num_attention_heads} != 0")
        if lm.hidden_size % lm.num_attention_heads:
            errors.append(f"language.hidden_size {lm.hidden_size} % num_attention_heads {lm.num_attention_heads} != 0")
        if lm.num_attention_heads % lm.num_query_groups:
            errors.append(f"language.num_attention_heads {lm.num_attention_heads} % num_query_groups "
                          f"{lm.num_query_groups} != 0")
        for name, tid in [("bos", self.tokens.bos_token_id), ("eos", self.tokens.eos_token_id),
                          ("pad", self.tokens.pad_token_id), ("im_start", self.tokens.im_start_token_id),
                          *self.tokens.special.items()]:
            if not 0 <= tid < lm.vocab_size:
                errors.append(f"token {name} id {tid} is outside the vocabulary (vocab_size {lm.vocab_size})")
        missing = [t for t in SPECIAL_TOKENS if t not in self.tokens.special]
        if missing:
            errors.append(f"tokens.special lacks {missing}")
        if errors:
            raise ValueError(f"invalid model config '{self.name}':\n  " + "\n  ".join(errors))
        return self

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[name]).validate()

    # ---- plain dict / JSON -------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        def build(dc, sub):
            known = {f.name for f in fields(dc)}
            unknown = set(sub) - known
            if unknown:
                raise ValueError(f"unknown {dc.__name__} keys: {sorted(unknown)}")
            return dc(**sub)

        return cls(
            vision=build(VisionConfig, d.get("vision", {})),
            projector=build(ProjectorConfig, d.get("projector", {})),
            language=build(LanguageConfig, d.get("language", {})),
            tokens=build(TokenIds, d.get("tokens", {})),
            name=d.get("name", "custom"),
        ).validate()

    # ---- Hugging Face config.json (released Long-VITA layout) -----------------------------
    def to_hf_dict(self) -> Dict[str, Any]:
        """The released `config.json` layout: Qwen2Config fields plus a `visual` dict."""
        v, p, lm, t = self.vision, self.projector, self.language, self.tokens
        return {
            "architectures": ["LongVITAForCausalLM"],
            "model_type": "long_vita",
            "vocab_size": lm.vocab_size,
            "hidden_size": lm.hidden_size,
            "intermediate_size": lm.ffn_hidden_size,
            "num_hidden_layers": lm.num_layers,
            "num_attention_heads": lm.num_attention_heads,
            "num_key_value_heads": lm.num_query_groups,
            "hidden_act": "silu",
            "max_position_embeddings": lm.max_position_embeddings,
            "rms_norm_eps": lm.rms_norm_eps,
            "rope_theta": lm.rope_theta,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "torch_dtype": "bfloat16",
            "visual": {
                "hidden_size": v.hidden_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_attention_heads,
                "intermediate_size": v.ffn_hidden_size,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layernorm_epsilon,
                "qkv_bias": v.qkv_bias,
                "qk_normalization": False,
                "hidden_act": v.hidden_act,
                "norm_type": "layer_norm",
            },
            "downsample_ratio": p.downsample_ratio,
            "projector_layernorm_eps": p.layernorm_epsilon,
            "projector_hidden_size": p.ffn_hidden_size,
            "im_start_token_id": t.im_start_token_id,
            "special_token_ids": dict(t.special),
        }

    @classmethod
    def from_hf_dict(cls, d: Dict[str, Any], name: str = "hf") -> "ModelConfig":
        """Read a released (or this project's) Long-VITA `config.json` dict.

        Keys this project adds (special_token_ids, projector_*) are optional: a released
        config gets the Qwen2.5 defaults for them.
        """
        if d.get("model_type") not in ("long_vita", None):
            raise ValueError(f"config model_type is {d.get('model_type')!r}, expected 'long_vita'")
        if d.get("tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings=true is not a Long-VITA layout (its LM head is untied)")
        vis = d.get("visual") or d.get("vision_config")
        if not isinstance(vis, dict):
            raise ValueError("config has no 'visual' dict (the InternViT config of a Long-VITA checkpoint)")
        if vis.get("qk_normalization", False):
            raise ValueError("visual.qk_normalization=true (InternViT-6B style) is not supported")
        rope = d.get("rope_theta")
        if rope is None and isinstance(d.get("rope_parameters"), dict):
            rope = d["rope_parameters"].get("rope_theta")
        img = vis.get("image_size", 448)
        patch = vis.get("patch_size", 14)
        lm = LanguageConfig(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_query_groups=d.get("num_key_value_heads", d["num_attention_heads"]),
            ffn_hidden_size=d["intermediate_size"], rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope if rope is not None else 1e6),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
        )
        vision = VisionConfig(
            hidden_size=vis["hidden_size"], num_layers=vis["num_hidden_layers"],
            num_attention_heads=vis["num_attention_heads"], ffn_hidden_size=vis["intermediate_size"],
            image_size=img[0] if isinstance(img, (list, tuple)) else img,
            patch_size=patch[0] if isinstance(patch, (list, tuple)) else patch,
            num_channels=vis.get("num_channels", 3), layernorm_epsilon=vis.get("layer_norm_eps", 1e-6),
            qkv_bias=vis.get("qkv_bias", True), hidden_act=vis.get("hidden_act", "gelu"),
        )
        projector = ProjectorConfig(
            downsample_ratio=d.get("downsample_ratio", 0.5),
            layernorm_epsilon=d.get("projector_layernorm_eps", 1e-5),
            ffn_hidden_size=d.get("projector_hidden_size", vision.hidden_size),
        )
        eos = d.get("eos_token_id", 151645)
        tokens = TokenIds(
            bos_token_id=d.get("bos_token_id", 151643),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id") if d.get("pad_token_id") is not None else d.get("bos_token_id", 151643),
            im_start_token_id=d.get("im_start_token_id", 151644),
        )
        if d.get("special_token_ids"):
            tokens.special = {k: int(v) for k, v in d["special_token_ids"].items()}
        return cls(vision=vision, projector=projector, language=lm, tokens=tokens, name=name).validate()

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path} not found: not a Hugging Face checkpoint directory")
        with open(cfg_path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d, name=os.path.basename(os.path.normpath(path)))
        except KeyError as e:
            raise ValueError(f"{cfg_path}: missing key {e}") from None
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from None


def _tiny() -> ModelConfig:
    vocab = 512
    return ModelConfig(
        vision=VisionConfig(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                            image_size=56, patch_size=14),
        projector=ProjectorConfig(ffn_hidden_size=128),
        language=LanguageConfig(vocab_size=vocab, hidden_size=128, num_layers=4, num_attention_heads=4,
                                num_query_groups=2, ffn_hidden_size=256, max_position_embeddings=4096),
        tokens=TokenIds.at_end_of_vocab(vocab),
        name="tiny",
    )


PRESETS: Dict[str, ModelConfig] = {
    "long-vita-14b": ModelConfig(name="long-vita-14b"),
    "tiny": _tiny(),
}


def resolve_model_config(spec: Optional[str]) -> ModelConfig:
    """A preset name, a Hugging Face checkpoint directory, or a JSON file of `to_dict()`."""
    if spec is None:
        return ModelConfig.from_name("tiny")
    if spec in PRESETS:
        return ModelConfig.from_name(spec)
    if os.path.isdir(spec):
        return ModelConfig.from_hf_dir(spec)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return ModelConfig.from_dict(json.load(f))
    raise ValueError(f"model '{spec}' is neither a preset ({sorted(PRESETS)}) nor a checkpoint dir or JSON file")
