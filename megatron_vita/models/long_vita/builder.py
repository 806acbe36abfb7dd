"""Build this rank's Long-VITA model chunks for a parallel layout (Megatron's model_provider).

With a virtual pipeline a rank holds several chunks; megatron decides which layers a chunk
holds from its global virtual-pipeline rank, so each chunk is built with that rank set.
Chunks are built on the platform's device (`platform.placement`: directly on an accelerator as
Megatron-LM does, or initialised on the host and moved when `use_cpu_initialization` asks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core import parallel_state as ps

from megatron_vita.config.model import ModelConfig
from megatron_vita.config.parallel import ParallelConfig
from megatron_vita.models.common.leaves import select_leaves
from megatron_vita.models.language.qwen2 import language_transformer_config
from megatron_vita.models.long_vita.model import LongVITAModel
from megatron_vita.parallel.state import virtual_pipeline_rank
from megatron_vita.platform import placement


def padded_vocab_size(vocab_size: int, tp: int, make_vocab_size_divisible_by: int = 1) -> int:
    """ParallelConfig.padded_vocab_size for callers that hold TP and the divisor separately."""
    return ParallelConfig(tensor_model_parallel_size=tp,
                          make_vocab_size_divisible_by=make_vocab_size_divisible_by).padded_vocab_size(vocab_size)


@dataclass
class BuildOptions:
    params_dtype: torch.dtype = torch.float32
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Long-VITA's logits-masked LM head in training (full logits when False).
    logits_mask: bool = True
    # Megatron-LM's --use-cpu-initialization: None lets the platform decide (host init only when
    # the device is the host; placement.host_initialization says why). True on an accelerator
    # gives the CPU backend's initial weights for the same seed, at any TP.
    use_cpu_initialization: Optional[bool] = None


def chunk_layers(model_config: ModelConfig, par: ParallelConfig, pp_rank: int, vp: int = 0) -> List[int]:
    """Global LLM layer indices held by (pp_rank, virtual chunk vp)."""
    return par.layers_per_stage(model_config.language.num_layers)[vp * par.pp + pp_rank]


def build_model_chunks(
    model_config: ModelConfig,
    par: ParallelConfig,
    options: Optional[BuildOptions] = None,
    language_layer_spec=None,
    vision_layer_spec=None,
) -> List[LongVITAModel]:
    """This rank's chunks (one unless VPP), every parameter and buffer on the platform's device
    in `options.params_dtype`.

    Megatron's process groups must already exist (megatron_vita.parallel.initialize_parallel).
    Layer specs default to the leaves models.common.leaves.select_leaves picks for the layout.
    """
    options = options or BuildOptions()
    par.validate(model_config)
    leaves = select_leaves(par)
    language_layer_spec = language_layer_spec or leaves.language_layer_spec()
    vision_layer_spec = vision_layer_spec or leaves.vision_layer_spec()
    device = placement.device()
    host_init = placement.host_initialization(options.use_cpu_initialization, device)
    config = language_transformer_config(
        model_config.language, par, params_dtype=options.params_dtype,
        recompute_granularity=options.recompute_granularity, recompute_method=options.recompute_method,
        recompute_num_layers=options.recompute_num_layers, use_cpu_initialization=host_init,
    )
    vocab = par.padded_vocab_size(model_config.language.vocab_size)
    chunks = []
    for vp in range(par.vpp or 1):
        with virtual_pipeline_rank(vp), placement.building(device, host_init):
            chunk = LongVITAModel(
                model_config, config, vocab,
                pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                language_layer_spec=language_layer_spec, vision_layer_spec=vision_layer_spec,
                mask_logits=options.logits_mask,
            )
        chunks.append(placement.place_module(chunk, device))
    return chunks
