"""Where each tensor of a Megatron checkpoint lives: rank files, model chunks, local names.

A layout is a `ParallelConfig`: Megatron's TP / PP / VPP split (uneven first/last stages
included) plus the vocab padding divisor. Pipeline chunks are ordered as Megatron lays layers
out (`vp * pp + pp_rank`); the ViT, projector and embedding live in the first chunk, the final
norm and LM head in the last. Names inside a chunk use chunk-local layer indices. Directory
names follow Megatron: `iter_XXXXXXX/mp_rank_TT` (PP 1) or `mp_rank_TT_PPP`, with
`latest_checkpointed_iteration.txt` beside the iteration directories ("release" is accepted
when reading).
"""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron_vita.checkpoint import mapping
from megatron_vita.config.model import ModelConfig
from megatron_vita.config.parallel import ParallelConfig

TRACKER = "latest_checkpointed_iteration.txt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_ITER_DIR = re.compile(r"iter_(\d{7})")


@dataclass(frozen=True)
class Chunk:
    pp_rank: int
    vp: int
    layers: Tuple[int, ...]  # global LLM layer indices, in order
    has_embedding: bool  # ViT, projector and word embeddings
    has_head: bool  # final norm and output layer
    model_key: str  # "model", or "model0", "model1", ... with a virtual pipeline


def chunks(layout: ParallelConfig, cfg: ModelConfig) -> List[Chunk]:
    """Every (pipeline rank, virtual chunk) of `layout` in Megatron's layer order."""
    per_chunk = layout.layers_per_stage(cfg.language.num_layers)
    vpp = layout.vpp or 1
    out = []
    for vp in range(vpp):
        for pp_rank in range(layout.pp):
            out.append(Chunk(pp_rank, vp, tuple(per_chunk[vp * layout.pp + pp_rank]),
                             has_embedding=(pp_rank == 0 and vp == 0),
                             has_head=(pp_rank == layout.pp - 1 and vp == vpp - 1),
                             model_key="model" if layout.vpp is None else f"model{vp}"))
    return out


def _position(p: mapping.Param) -> Tuple[int, float]:
    """Sort key: ViT, projector, then the LLM; inside each, layer-major like a state dict."""
    component = 0 if p.name.startswith(mapping.VIT) else 1 if p.name.startswith(mapping.PROJ) else 2
    if p.layer is not None:
        return component, p.layer
    before = p.name.startswith(mapping.VIT) or ".embedding." in p.name
    return component, -1 if before else math.inf


def ordered_params(cfg: ModelConfig) -> List[mapping.Param]:
    """All parameters in state-dict-like order (stable inside a layer)."""
    return sorted(mapping.all_params(cfg), key=_position)


def chunk_params(cfg: ModelConfig, chunk: Chunk) -> List[Tuple[mapping.Param, str]]:
    """(param, chunk-local megatron-core name) for every parameter the chunk holds."""
    out = []
    for p in ordered_params(cfg):
        if p.name.startswith(mapping.LLM + "decoder.layers."):
            if p.layer in chunk.layers:
                out.append((p, mapping.global_to_local(p.name, list(chunk.layers))))
        elif p.name.startswith((mapping.VIT, mapping.PROJ)) or ".embedding." in p.name:
            if chunk.has_embedding:
                out.append((p, p.name))
        elif chunk.has_head:
            out.append((p, p.name))
    return out


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def parse_rank_dir(name: str) -> Optional[Tuple[int, int]]:
    """(tp rank, pp rank) of an `mp_rank_TT[_PPP]` directory name, else None."""
    m = _RANK_DIR.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def resolve_iteration_dir(path: str) -> Tuple[str, Optional[int]]:
    """A Megatron save root (tracker file) or an iteration directory -> (iteration dir, iteration)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Megatron checkpoint directory {path} does not exist")
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
        if text == "release":
            return os.path.join(path, "release"), None
        if not text.isdigit():
            raise ValueError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
        it_dir = os.path.join(path, iteration_dir_name(int(text)))
        if not os.path.isdir(it_dir):
            raise FileNotFoundError(f"{tracker} names iteration {text} but {it_dir} does not exist")
        return it_dir, int(text)
    m = re.match(r"^iter_(\d+)$", os.path.basename(os.path.normpath(path)))
    if m or os.path.basename(os.path.normpath(path)) == "release":
        return path, int(m.group(1)) if m else None
    raise FileNotFoundError(f"{path} is not a Megatron checkpoint: no {TRACKER} and not an iter_XXXXXXX directory")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration the tracker names (None without one); its directory may be incomplete."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def saved_iterations(root: str) -> List[int]:
    """Iterations with an iter_XXXXXXX directory under `root` (complete or not), ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_DIR.fullmatch, os.listdir(root))
                  if m and os.path.isdir(os.path.join(root, m.group(0))))


def write_tracker(root: str, iteration: int) -> None:
    with open(os.path.join(root, TRACKER), "w", encoding="utf-8") as f:
        f.write(str(iteration))


def megatron_args(cfg: ModelConfig, layout: ParallelConfig, dtype: torch.dtype, iteration: int) -> argparse.Namespace:
    """The training flags Megatron / MindSpeed readers look for in `args` (sizes and layout)."""
    lm = cfg.language
    return argparse.Namespace(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_per_virtual_pipeline_stage=(lm.num_layers // (layout.pp * layout.vpp)) if layout.vpp else None,
        decoder_first_pipeline_num_layers=layout.num_layers_in_first_pipeline_stage,
        decoder_last_pipeline_num_layers=layout.num_layers_in_last_pipeline_stage,
        num_layers=lm.num_layers, hidden_size=lm.hidden_size, ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_attention_heads, group_query_attention=lm.num_query_groups != lm.num_attention_heads,
        num_query_groups=lm.num_query_groups, kv_channels=lm.kv_channels, vocab_size=lm.vocab_size,
        padded_vocab_size=layout.padded_vocab_size(lm.vocab_size),
        make_vocab_size_divisible_by=layout.make_vocab_size_divisible_by,
        max_position_embeddings=lm.max_position_embeddings, norm_epsilon=lm.rms_norm_eps, rotary_base=lm.rope_theta,
        normalization="RMSNorm", swiglu=True, add_qkv_bias=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=True, position_embedding_type="rope",
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, iteration=iteration,
    )


def vocab_divisor(args: Optional[argparse.Namespace]) -> int:
    """The --make-vocab-size-divisible-by a checkpoint's `args` record (1 without args)."""
    return int(getattr(args, "make_vocab_size_divisible_by", 1) or 1) if args is not None else 1


def layout_from_args(args: Optional[argparse.Namespace]) -> ParallelConfig:
    """The layout a checkpoint's Megatron `args` record (TP1 PP1 without args)."""
    return ParallelConfig(
        tensor_model_parallel_size=int(getattr(args, "tensor_model_parallel_size", 1) or 1),
        pipeline_model_parallel_size=int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
        virtual_pipeline_model_parallel_size=getattr(args, "virtual_pipeline_model_parallel_size", None),
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
        make_vocab_size_divisible_by=vocab_divisor(args))


def layout_from_chunks(tp: int, pp: int, vpp: Optional[int], layer_counts: Dict[Tuple[int, int], int],
                       num_layers: int, where: str, make_vocab_size_divisible_by: int = 1) -> ParallelConfig:
    """Reconstruct a layout from the layer count found in each (pp rank, vp) chunk of a checkpoint."""
    stages = pp * (vpp or 1)
    counts = [layer_counts.get((pp_rank, vp), 0) for vp in range(vpp or 1) for pp_rank in range(pp)]
    if sum(counts) != num_layers:
        raise ValueError(f"{where}: the chunks hold {sum(counts)} LLM layers ({counts}), the model config has {num_layers}")
    layout = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            virtual_pipeline_model_parallel_size=vpp,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    if len(set(counts)) > 1 or num_layers % stages:
        first, last = counts[0], counts[-1]
        middle = counts[1:-1]
        if vpp or len(set(middle)) > 1:
            raise ValueError(f"{where}: layer counts per pipeline chunk {counts} are not a layout this project "
                             "supports (even, or uneven first/last stage without VPP)")
        layout.num_layers_in_first_pipeline_stage = first
        layout.num_layers_in_last_pipeline_stage = last if pp > 1 else None
    return layout
