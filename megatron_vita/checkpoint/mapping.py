"""The declared HF <-> megatron-core weight mapping for Long-VITA, and how each tensor shards.

One rule per parameter family (a table, not a cascade of ifs). A rule names the megatron-core
parameter (this project's names, global layer index `{i}`), the HF parameter(s) it is made of,
the transform between them and how the megatron tensor splits over tensor-parallel ranks
(each name is one class in `tensor_kinds`):

  transform  qkv      HF q/k/v (or the ViT's fused [all Q; all K; all V]) <-> megatron's fused
                      QKV grouped per KV group: [q heads of group g; k_g; v_g] for g in groups
                      (for the ViT's MHA this is the per-head interleave [q_h, k_h, v_h]).
             glu      HF gate/up <-> fc1 = [gate; up].
             pos      HF position_embedding [1, N, C] <-> megatron [N, C].
  shard      column   dim 0 in TP contiguous chunks   row   dim 1
             vocab    dim 0 after padding the vocabulary to the layout's padded size
             glu      gate and up halves split separately: rank r gets [gate_r; up_r]
             replicated

Everything works tensor by tensor, so converters can stream: `verify`, `convert`, training's
HF initialisation and HF export all go through these functions. `row_segments` describes a
full megatron tensor as runs of HF rows (readers and writers place rows without copies);
`place` puts one TP piece into a full tensor (readers assemble piece by piece).

Megatron checkpoints in the wild name the same tensors differently. `NAMINGS` declares each
variant as ordered regex renames of this project's names (values and sharding are identical):
  mcore      this project's names (`language_model.`, `vision_model.`, `vision_projection.`)
  mindspeed  released MindSpeed weights: LLM at the top level, ViT under
             `external_feature_model.vit.`, projector under `external_feature_model.`, and a
             dummy `unused` [hidden] tensor
  te         released `*_MG` weights: mindspeed names with TransformerEngine's fused norms
             (`linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`, `_bias`)
`sharded_key` gives the dist-checkpoint key of a name (layer index moved to a prepended axis).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_vita.checkpoint.tensor_kinds import SHARD_KINDS, TRANSFORMS, ShardKind, Transform
from megatron_vita.config.model import ModelConfig

LLM = "language_model."
VIT = "vision_model."
PROJ = "vision_projection."


@dataclass(frozen=True)
class Rule:
    mcore: str  # megatron-core name pattern; {i} = global layer index
    hf: Tuple[str, ...]  # HF name pattern(s); {i} = the same layer index
    transform: str = "identity"  # a key of tensor_kinds.TRANSFORMS
    shard: str = "replicated"  # a key of tensor_kinds.SHARD_KINDS
    layer: Optional[str] = None  # "llm" | "vit": which layer count {i} ranges over

    def __post_init__(self):
        if self.transform not in TRANSFORMS or self.shard not in SHARD_KINDS:
            raise ValueError(f"rule {self.mcore}: unknown transform {self.transform!r} or shard kind {self.shard!r}")

    @property
    def transform_kind(self) -> Transform:
        return TRANSFORMS[self.transform]

    @property
    def shard_kind(self) -> ShardKind:
        return SHARD_KINDS[self.shard]

    def layer_count(self, cfg: ModelConfig) -> Optional[int]:
        """How many layers {i} ranges over (None for a rule outside the layers)."""
        return {None: None, "llm": cfg.language.num_layers, "vit": cfg.vision.num_layers}[self.layer]


RULES: Tuple[Rule, ...] = (
    # Language model
    Rule(LLM + "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), shard="vocab"),
    Rule(LLM + "decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), layer="llm"),
    Rule(LLM + "decoder.layers.{i}.self_attention.linear_qkv.weight",
         tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv", "column", "llm"),
    Rule(LLM + "decoder.layers.{i}.self_attention.linear_qkv.bias",
         tuple(f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv", "column", "llm"),
    Rule(LLM + "decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",),
         shard="row", layer="llm"),
    Rule(LLM + "decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         layer="llm"),
    Rule(LLM + "decoder.layers.{i}.mlp.linear_fc1.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "glu", "glu", "llm"),
    Rule(LLM + "decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",),
         shard="row", layer="llm"),
    Rule(LLM + "decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule(LLM + "output_layer.weight", ("lm_head.weight",), shard="vocab"),
    # Vision tower
    Rule(VIT + "conv1.weight", ("model.vision_model.embeddings.patch_embedding.weight",)),
    Rule(VIT + "conv1.bias", ("model.vision_model.embeddings.patch_embedding.bias",)),
    Rule(VIT + "class_token", ("model.vision_model.embeddings.class_embedding",)),
    Rule(VIT + "position_embeddings.weight", ("model.vision_model.embeddings.position_embedding",), "pos"),
    *(Rule(VIT + f"decoder.layers.{{i}}.{mc}.{wb}", (f"model.vision_model.encoder.layers.{{i}}.{hf}.{wb}",),
           layer="vit") for mc, hf in (("input_layernorm", "norm1"), ("pre_mlp_layernorm", "norm2"))
      for wb in ("weight", "bias")),
    *(Rule(VIT + f"decoder.layers.{{i}}.self_attention.linear_qkv.{wb}",
           (f"model.vision_model.encoder.layers.{{i}}.attn.qkv.{wb}",), "vit_qkv", "column", "vit")
      for wb in ("weight", "bias")),
    Rule(VIT + "decoder.layers.{i}.self_attention.linear_proj.weight",
         ("model.vision_model.encoder.layers.{i}.attn.proj.weight",), shard="row", layer="vit"),
    Rule(VIT + "decoder.layers.{i}.self_attention.linear_proj.bias",
         ("model.vision_model.encoder.layers.{i}.attn.proj.bias",), layer="vit"),
    Rule(VIT + "decoder.layers.{i}.mlp.linear_fc1.weight", ("model.vision_model.encoder.layers.{i}.mlp.fc1.weight",),
         shard="column", layer="vit"),
    Rule(VIT + "decoder.layers.{i}.mlp.linear_fc1.bias", ("model.vision_model.encoder.layers.{i}.mlp.fc1.bias",),
         shard="column", layer="vit"),
    Rule(VIT + "decoder.layers.{i}.mlp.linear_fc2.weight", ("model.vision_model.encoder.layers.{i}.mlp.fc2.weight",),
         shard="row", layer="vit"),
    Rule(VIT + "decoder.layers.{i}.mlp.linear_fc2.bias", ("model.vision_model.encoder.layers.{i}.mlp.fc2.bias",),
         layer="vit"),
    Rule(VIT + "decoder.layers.{i}.ls1", ("model.vision_model.encoder.layers.{i}.ls1",), layer="vit"),
    Rule(VIT + "decoder.layers.{i}.ls2", ("model.vision_model.encoder.layers.{i}.ls2",), layer="vit"),
    # Projector
    Rule(PROJ + "layernorm.weight", ("model.vision_projection.pre_proj_layernorm.weight",)),
    Rule(PROJ + "layernorm.bias", ("model.vision_projection.pre_proj_layernorm.bias",)),
    Rule(PROJ + "linear_fc1.weight", ("model.vision_projection.mlp.0.weight",), shard="column"),
    Rule(PROJ + "linear_fc2.weight", ("model.vision_projection.mlp.2.weight",), shard="row"),
)


def _pattern(template: str) -> "re.Pattern":
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_MCORE_PATTERNS = [(_pattern(r.mcore), r) for r in RULES]


@dataclass(frozen=True)
class Param:
    """One concrete megatron-core parameter (global layer index) and its HF sources."""

    name: str
    hf_names: Tuple[str, ...]
    rule: Rule
    layer: Optional[int]


def _concrete(rule: Rule, i: Optional[int]) -> Param:
    fmt = (lambda s: s.replace("{i}", str(i))) if i is not None else (lambda s: s)
    return Param(fmt(rule.mcore), tuple(fmt(h) for h in rule.hf), rule, i)


def all_params(cfg: ModelConfig) -> List[Param]:
    """Every parameter of the full model, in a stable order (embedding -> layers -> head -> ViT)."""
    out = []
    for rule in RULES:
        if rule.layer is None:
            out.append(_concrete(rule, None))
        else:
            out.extend(_concrete(rule, i) for i in range(rule.layer_count(cfg)))
    return out


def lookup(mcore_name: str) -> Param:
    """The rule behind a global megatron-core name (clear KeyError for unknown names)."""
    for pat, rule in _MCORE_PATTERNS:
        m = pat.match(mcore_name)
        if m:
            return _concrete(rule, int(m.group(1)) if m.groups() else None)
    raise KeyError(f"no HF mapping for megatron-core parameter '{mcore_name}'")


def hf_names_of(cfg: ModelConfig) -> List[str]:
    return [h for p in all_params(cfg) for h in p.hf_names]


# ---- transforms and tensor-parallel sharding (what the names mean: tensor_kinds) --------------

def _heads(cfg: ModelConfig, rule: Rule) -> Tuple[int, int, int]:
    """(query heads, kv groups, head dim) of the attention a rule belongs to."""
    if rule.layer == "vit":
        v = cfg.vision
        return v.num_attention_heads, v.num_attention_heads, v.kv_channels
    lm = cfg.language
    return lm.num_attention_heads, lm.num_query_groups, lm.kv_channels


def to_mcore(cfg: ModelConfig, param: Param, hf: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full megatron tensor from its HF tensor(s) (in `param.hf_names` order)."""
    return param.rule.transform_kind.to_mcore(hf, _heads(cfg, param.rule))


def to_hf(cfg: ModelConfig, param: Param, full: torch.Tensor) -> Dict[str, torch.Tensor]:
    """HF tensor(s) from the full megatron tensor."""
    return param.rule.transform_kind.to_hf(param.hf_names, full, _heads(cfg, param.rule))


def row_segments(cfg: ModelConfig, param: Param) -> Optional[List[Tuple[str, int, int]]]:
    """The full megatron tensor's rows as (HF name, first HF row, row count) runs, in order.

    Transforms that only rearrange whole rows give these runs, so a converter can read or write
    each run straight from or to its place (no intermediate HF-shaped tensors, no
    concatenation); None for the others (`pos`).
    """
    return param.rule.transform_kind.row_segments(param.hf_names, _heads(cfg, param.rule))


def shard(param: Param, full: torch.Tensor, tp: int, rank: int, padded_vocab: Optional[int] = None) -> torch.Tensor:
    """This TP rank's piece of a full megatron tensor."""
    return param.rule.shard_kind.shard(full, tp, rank, padded_vocab)


def unshard(param: Param, pieces: Sequence[torch.Tensor], vocab_size: Optional[int] = None) -> torch.Tensor:
    """Full megatron tensor from all TP ranks' pieces (padded vocabulary rows dropped)."""
    return param.rule.shard_kind.unshard(pieces, vocab_size)


def place(param: Param, full: torch.Tensor, piece: torch.Tensor, tp: int, rank: int) -> None:
    """Copy TP rank `rank`'s piece into the full tensor (padded vocabulary rows dropped).

    The piece-at-a-time form of `unshard`: a reader can release each piece's source before
    reading the next.
    """
    param.rule.shard_kind.place(full, piece, tp, rank)


def vocab_param(cfg: ModelConfig) -> Param:
    """The first parameter whose rows are the (padded) vocabulary: the word embeddings."""
    return next(p for p in all_params(cfg) if p.rule.shard_kind.pads_vocab)


# ---- local (per pipeline chunk) <-> global names ------------------------------------------------

_LLM_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)(\..*)$")


def local_to_global(name: str, layer_ids: Sequence[int]) -> str:
    """A chunk's state-dict name (local layer index) -> the global name."""
    m = _LLM_LAYER.match(name)
    return f"{m.group(1)}{layer_ids[int(m.group(2))]}{m.group(3)}" if m else name


def global_to_local(name: str, layer_ids: Sequence[int]) -> Optional[str]:
    """The chunk-local name of a global name, or None when the layer is not in this chunk."""
    m = _LLM_LAYER.match(name)
    if not m:
        return name
    i = int(m.group(2))
    return f"{m.group(1)}{layer_ids.index(i)}{m.group(3)}" if i in layer_ids else None


def iter_model_params(state_dict_keys: Sequence[str]) -> Iterator[str]:
    """State-dict keys that are parameters (megatron's `_extra_state` entries skipped)."""
    return (k for k in state_dict_keys if not k.endswith("_extra_state"))


TensorSource = Callable[[str], torch.Tensor]


# ---- naming variants of Megatron checkpoints ----------------------------------------------------

_MINDSPEED = (
    (r"^language_model\.", ""),
    (r"^vision_model\.", "external_feature_model.vit."),
    (r"^vision_projection\.layernorm\.", "external_feature_model.pre_proj_layernorm."),
    (r"^vision_projection\.", "external_feature_model.vision_projection.encoder."),
)
# TransformerEngine fuses each pre-norm into the linear that follows it.
_TE_NORMS = (
    (r"(^|\.)decoder\.layers\.(\d+)\.input_layernorm\.(weight|bias)$",
     r"\1decoder.layers.\2.self_attention.linear_qkv.layer_norm_\3"),
    (r"(^|\.)decoder\.layers\.(\d+)\.pre_mlp_layernorm\.(weight|bias)$",
     r"\1decoder.layers.\2.mlp.linear_fc1.layer_norm_\3"),
)
NAMINGS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "mcore": (),
    "mindspeed": _MINDSPEED,
    "te": _TE_NORMS + _MINDSPEED,
}
_COMPILED = {k: tuple((re.compile(p), r) for p, r in v) for k, v in NAMINGS.items()}
# Tensors a variant carries that are not model parameters (written as zeros [hidden_size]).
DUMMIES: Dict[str, Tuple[str, ...]] = {"mindspeed": ("unused",)}
# Entries of a Megatron state dict that hold no weights of the model.
IGNORED = re.compile(r"(\._extra_state$|^unused$)")
# Megatron linear layers keep an `_extra_state` entry (None without TransformerEngine's FP8).
LINEAR_LEAVES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def rename(name: str, naming: str) -> str:
    """This project's megatron-core name (local or global layer index) in another naming."""
    if naming not in _COMPILED:
        raise ValueError(f"unknown naming {naming!r}; choose one of {sorted(NAMINGS)}")
    for pat, repl in _COMPILED[naming]:
        name = pat.sub(repl, name)
    return name


# Readers also accept a sibling variant's name for a tensor: a TE-named release may keep
# MindSpeed's local norm names in part of the model (e.g. the ViT).
_SIBLINGS = {"mcore": (), "mindspeed": ("te",), "te": ("mindspeed",)}


def reader_names(name: str, naming: str) -> Tuple[str, ...]:
    """Names a reader accepts for `name` in a checkpoint of `naming`, preferred first."""
    return tuple(dict.fromkeys(rename(name, n) for n in (naming,) + _SIBLINGS[naming]))


def detect_naming(names: Sequence[str]) -> str:
    """Which variant a Megatron state dict's keys use (raises when none fits)."""
    params = [n for n in names if not IGNORED.search(n)]
    if any(n.startswith((LLM, VIT, PROJ)) for n in params):
        return "mcore"
    if any(".layer_norm_weight" in n for n in params):
        return "te"
    if any(n.startswith(("embedding.", "decoder.", "output_layer.", "external_feature_model.")) for n in params):
        return "mindspeed"
    raise ValueError(f"cannot tell the naming of a Megatron state dict with keys like {list(params)[:4]}: expected "
                     "this project's names (language_model.*), MindSpeed names (decoder.*, "
                     "external_feature_model.*) or TransformerEngine names (*.layer_norm_weight)")


_LAYER = re.compile(r"^((?:.*\.)?decoder\.layers\.)(\d+)\.(.*)$")


def sharded_key(name: str) -> Tuple[str, Optional[int]]:
    """Dist-checkpoint key and layer index of a (global) name: layers share one key."""
    m = _LAYER.match(name)
    return (m.group(1) + m.group(3), int(m.group(2))) if m else (name, None)


def extra_state_owner(name: str) -> Optional[str]:
    """The module (name prefix) whose `_extra_state` sits beside parameter `name`, if any."""
    module, _, leaf = name.rpartition(".")
    if leaf == "weight" and module.rsplit(".", 1)[-1] in LINEAR_LEAVES:
        return module
    return None
