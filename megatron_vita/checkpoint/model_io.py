"""Move weights between HF tensors and live megatron-core model chunks at any parallel layout.

`load_hf_weights` fills this rank's chunks from any tensor source keyed by HF names (an
HFCheckpoint, a dict): each parameter is read, transformed to the megatron layout, cut to this
rank's TP piece and checked against the parameter's shape. Nothing is silently skipped: a
parameter with no source, or a shape that disagrees, is an error naming the key and shapes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Union

import torch
from megatron.core import parallel_state as ps

from megatron_vita.checkpoint import mapping
from megatron_vita.config.model import ModelConfig
from megatron_vita.config.parallel import ParallelConfig
from megatron_vita.models.long_vita.builder import chunk_layers

TensorSource = Union[Callable[[str], torch.Tensor], Dict[str, torch.Tensor]]


def _getter(source) -> Callable[[str], torch.Tensor]:
    if isinstance(source, dict):
        def get(name):
            if name not in source:
                raise KeyError(f"source has no tensor '{name}'")
            return source[name]
        return get
    return source.get if hasattr(source, "get") else source


def chunk_parameters(chunk: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The chunk's parameters by state-dict name (no megatron `_extra_state` entries)."""
    return {k: v for k, v in chunk.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


@torch.no_grad()
def load_hf_weights(chunks: Sequence[torch.nn.Module], source: TensorSource, model_config: ModelConfig,
                    par: ParallelConfig) -> List[str]:
    """Copy HF-named tensors into this rank's chunks; returns the HF names that were read."""
    get = _getter(source)
    tp, tp_rank, pp_rank = par.tp, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    used = []
    for vp, chunk in enumerate(chunks):
        layers = chunk_layers(model_config, par, pp_rank, vp)
        for local, target in chunk_parameters(chunk).items():
            name = mapping.local_to_global(local, layers)
            param = mapping.lookup(name)
            try:
                hf = [get(h) for h in param.hf_names]
            except KeyError as e:
                raise KeyError(f"missing weight for megatron parameter '{name}': {e}") from None
            full = mapping.to_mcore(model_config, param, hf)
            padded = target.shape[0] * tp if param.rule.shard == "vocab" else None
            piece = mapping.shard(param, full, tp, tp_rank, padded)
            if piece.shape != target.shape:
                raise ValueError(
                    f"shape mismatch for '{name}' (from {', '.join(param.hf_names)}): source gives "
                    f"{tuple(piece.shape)} for TP rank {tp_rank}/{tp}, model expects {tuple(target.shape)}")
            target.copy_(piece.to(target.dtype))
            used.extend(param.hf_names)
    return used
