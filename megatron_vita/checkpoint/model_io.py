"""Move weights between HF tensors and live megatron-core model chunks at any parallel layout.

`load_hf_weights` fills this rank's chunks from any tensor source keyed by HF names (an
HFSource, a dict): each parameter is read, transformed to the megatron layout, cut to this
rank's TP piece and checked against the parameter's shape. Nothing is silently skipped: a
parameter with no source, or a shape that disagrees, is an error naming the key and shapes.
`load_full_weights` does the same from full megatron-core tensors (a converter source), and
`load_checkpoint_weights` fills chunks from a checkpoint of any kind (HF, legacy, torch_dist).
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
    return source.read if hasattr(source, "read") else source  # an HFSource, or a callable


def chunk_parameters(chunk: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The chunk's parameters by state-dict name (no megatron `_extra_state` entries)."""
    return {k: v for k, v in chunk.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


@torch.no_grad()
def _fill(chunks: Sequence[torch.nn.Module], full_of: Callable[[mapping.Param], torch.Tensor],
          model_config: ModelConfig, par: ParallelConfig, origin: Callable[[mapping.Param], str],
          missing_ok: Sequence[str] = ()) -> List[mapping.Param]:
    """Copy this rank's TP piece of `full_of(param)` into every parameter of the chunks.

    `full_of` raises KeyError when its source lacks a tensor: parameters whose name starts with
    one of `missing_ok` then keep their values, any other is an error naming the parameter.
    `origin(param)` names where a parameter's tensor came from in a shape-mismatch error.
    Returns the parameters that were filled.
    """
    tp, tp_rank, pp_rank = par.tp, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    filled = []
    for vp, chunk in enumerate(chunks):
        layers = chunk_layers(model_config, par, pp_rank, vp)
        for local, target in chunk_parameters(chunk).items():
            param = mapping.lookup(mapping.local_to_global(local, layers))
            try:
                full = full_of(param)
            except KeyError as e:
                if param.name.startswith(tuple(missing_ok)):
                    continue
                raise KeyError(f"missing weight for megatron parameter '{param.name}': {e}") from None
            # The chunk's rows are the padded vocabulary of its layout (kinds that do not pad ignore it).
            piece = mapping.shard(param, full, tp, tp_rank, target.shape[0] * tp)
            if piece.shape != target.shape:
                raise ValueError(f"shape mismatch for '{param.name}' from {origin(param)}: it gives "
                                 f"{tuple(piece.shape)} for TP rank {tp_rank}/{tp}, the model expects "
                                 f"{tuple(target.shape)}")
            target.copy_(piece.to(target.dtype))
            filled.append(param)
    return filled


def load_hf_weights(chunks: Sequence[torch.nn.Module], source: TensorSource, model_config: ModelConfig,
                    par: ParallelConfig, missing_ok: Sequence[str] = ()) -> List[str]:
    """Copy HF-named tensors into this rank's chunks; returns the HF names that were read.

    Megatron parameters whose name starts with one of `missing_ok` keep their initial values
    when the source lacks them (e.g. a new projector between a pretrained LLM and ViT).
    """
    get = _getter(source)
    filled = _fill(chunks, lambda p: mapping.to_mcore(model_config, p, [get(h) for h in p.hf_names]), model_config,
                   par, lambda p: ", ".join(p.hf_names), missing_ok)
    return [h for p in filled for h in p.hf_names]


def load_full_weights(chunks: Sequence[torch.nn.Module], full_of: Callable[[mapping.Param], torch.Tensor],
                      model_config: ModelConfig, par: ParallelConfig, where: str = "source") -> None:
    """Copy full megatron-core tensors (`full_of(param)`, e.g. a converter source's `full`) into the chunks."""
    _fill(chunks, full_of, model_config, par, lambda p: where)


class PartsSource:
    """HF tensors from separately released parts: a Qwen2 LLM and an InternViT-300M directory.

    The ViT checkpoint (e.g. OpenGVLab/InternViT-300M-448px) uses the released Long-VITA ViT names
    without the `model.vision_model.` prefix; the LLM (Qwen2.5-*-Instruct) uses Qwen2 names. The
    projector has no source: it starts from its initialisation, as Long-VITA's stage 1 does.
    """

    VIT_PREFIX = "model.vision_model."

    def __init__(self, llm_dir: str, vit_dir: str, cfg: ModelConfig):
        from megatron_vita.checkpoint.hf_format import HFSource

        self.llm, self.vit = HFSource(llm_dir, cfg), HFSource(vit_dir, cfg)

    def read(self, name: str) -> torch.Tensor:
        if name.startswith(self.VIT_PREFIX):
            return self.vit.read(name[len(self.VIT_PREFIX):])
        if name.startswith("model.vision_projection."):
            raise KeyError(f"'{name}' (the projector is trained from scratch in stage 1)")
        return self.llm.read(name)


def load_checkpoint_weights(chunks: Sequence[torch.nn.Module], kind: str, path: str, model_config: ModelConfig,
                            par: ParallelConfig) -> str:
    """Fill this rank's chunks (built at `par`, its vocab divisor included) from a checkpoint of
    any kind; returns how it was loaded.

    HF: `load_hf_weights`. torch_dist in this project's names whose vocabulary padding fits
    the chunks: megatron's own `dist_checkpointing.load` (what training does). Anything else
    (legacy files, MindSpeed/TE names, other padding): the converter's streaming readers.
    """
    if kind == "hf":
        from megatron_vita.checkpoint.hf_format import HFSource

        load_hf_weights(chunks, HFSource(path), model_config, par)
        return "HF weights"
    from megatron_vita.checkpoint.sources import megatron_format_of

    if megatron_format_of(path) == "torch_dist":
        from megatron_vita.checkpoint.dist_format import DistSource

        source = DistSource(path, model_config)
        rows = source.tensors.get(mapping.sharded_key(mapping.vocab_param(model_config).name)[0])
        # Decided from the layout alone, so that every rank takes the same (collective) path.
        chunk_rows = par.padded_vocab_size(model_config.language.vocab_size)
        if source.naming == "mcore" and rows is not None and rows.size[0] == chunk_rows:
            _dist_load(chunks, source.iter_dir)
            return "megatron dist_checkpointing.load"
    else:
        from megatron_vita.checkpoint.legacy_format import LegacySource

        source = LegacySource(path, model_config)
    load_full_weights(chunks, source.full, model_config, par, where=path)
    source.close()
    return f"streamed from {source.format} ({source.naming} names)"


def _dist_load(chunks: Sequence[torch.nn.Module], iter_dir: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_vita.parallel.state import virtual_pipeline_rank

    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    template = {}
    for i, (key, chunk) in enumerate(zip(keys, chunks)):
        with virtual_pipeline_rank(i):
            template[key] = chunk.sharded_state_dict()
    state = dist_checkpointing.load(template, iter_dir)
    for key, chunk in zip(keys, chunks):
        missing, unexpected = chunk.load_state_dict(state[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{iter_dir}: model keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
