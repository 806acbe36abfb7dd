"""Forward passes of megatron-core Long-VITA loaded from a checkpoint, on ranks spawned here.

`megatron_logits` starts TP*PP*CP ranks of a layout over real process groups; each builds its
model chunks, fills them from a checkpoint of any kind and format
(`checkpoint.model_io.load_checkpoint_weights`: HF, legacy or torch_dist, any naming) and runs
every input through the pipeline (`parallel.pipeline.forward_only`, which under context
parallelism gives each CP rank its load-balanced share of the input, padding it to the CP
multiple, and gathers the logits back into the input's order). The logits come back from one
rank that holds them, vocabulary padding dropped. `verify` compares them with transformers';
generation is meant to add its decoding loop on the same loaded chunks, which is why this lives
outside `checkpoint/` (it runs a model; it does not read or write checkpoint files itself).

An input is any object with `input_ids` ([1, s] token ids) and `pixel_values` ([n, 3, H, W]
image tiles / video frames, or None); the inputs and the results travel to and from the ranks
as `platform.spawn` arguments and return values.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from megatron_vita.config.dtypes import torch_dtype
from megatron_vita.config.parallel import ParallelConfig

if TYPE_CHECKING:  # torch is imported inside functions: the CLI's `--help` stays fast
    import torch

    from megatron_vita.config.model import ModelConfig


def megatron_logits_rank(rank: int, world: int, cfg_dict: Dict, weights: Tuple[str, str], par: ParallelConfig,
                         inputs: Sequence[Any], dtype: str) -> Optional[Tuple[List["torch.Tensor"], str]]:
    """Runs on every rank: build the layout, load the weights, forward each input through the pipeline.

    weights = (kind "hf" | "megatron", path); `par` carries the vocab padding divisor of the build.
    Returns (logits per input, how the weights were loaded) on one rank that holds the logits
    (first TP, CP and DP rank of the last pipeline stage: every CP rank there has them gathered),
    None elsewhere.
    """
    from megatron_vita.checkpoint.model_io import load_checkpoint_weights
    from megatron_vita.config.model import ModelConfig
    from megatron_vita.models.long_vita.builder import BuildOptions, build_model_chunks
    from megatron_vita.parallel.pipeline import forward_only
    from megatron_vita.parallel.state import destroy_parallel, initialize_parallel

    cfg = ModelConfig.from_dict(cfg_dict)
    kind, path = weights
    par.validate(cfg, world)
    info = initialize_parallel(par)
    try:
        chunks = build_model_chunks(cfg, par, BuildOptions(params_dtype=torch_dtype(dtype)))
        how = load_checkpoint_weights(chunks, kind, path, cfg, par)
        results = []
        for inp in inputs:
            logits = forward_only(chunks, [{"tokens": inp.input_ids, "pixel_values": inp.pixel_values}])
            # Back on the host: the result is pickled to the parent, which may hold no device.
            results.append(None if logits is None else logits[0][..., :cfg.language.vocab_size].float().cpu())
        keep = info.tp_rank == 0 and info.cp_rank == 0 and info.dp_rank == 0 and results[0] is not None
        return (results, how) if keep else None
    finally:
        destroy_parallel()


def megatron_logits(cfg: "ModelConfig", kind: str, path: str, par: ParallelConfig, inputs: Sequence[Any],
                    dtype: str = "fp32", timeout: float = 900, backend: Optional[str] = None,
                    features: Sequence[str] = ()) -> Tuple[List["torch.Tensor"], str]:
    """Logits of every input from megatron-core at layout `par` (TP*PP*CP ranks), loaded from
    checkpoint `path` of `kind`; returns (logits, how the weights were loaded). `features`:
    kernel flags every rank applies (platform.spawn refuses ones the backend cannot run)."""
    from megatron_vita import platform

    world = par.model_parallel_size
    par.validate(cfg, world)  # a bad layout is one error here, not a traceback from every rank
    per_rank = platform.spawn(megatron_logits_rank, world, cfg.to_dict(), (kind, path), par, list(inputs), dtype,
                              timeout=timeout, backend=backend, features=features)
    return next(r for r in per_rank if r is not None)
