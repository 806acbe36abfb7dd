"""What a memory estimate is asked about: the model, the layout, the batch, recompute, the media.

Owns `EstimateInputs` (a typed description of one training configuration per device) and the
checks that refuse what training refuses, made with training's own rules (training.preflight):
the layout against the model, the world and the sequence length (training_layout, i.e.
ParallelConfig.problems with the context-parallel rules of parallel.context.validate.cp_problems),
the recompute flags, the batch split; plus what only an estimate needs (the media's feature
tokens must fit in the sequence). Each problem is one
line naming the flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from megatron_vita.config.model import ModelConfig, resolve_model_config
from megatron_vita.config.parallel import ConfigError, ParallelConfig

DEFAULT_SUPERVISED_TOKENS = 4096


@dataclass
class EstimateInputs:
    """One training configuration, as one device sees it.

    `model` is a preset name (long-vita-14b, tiny), an HF checkpoint directory or a ModelConfig.
    `supervised_tokens` (k) is how many positions of a sequence carry a label: the logits-masked
    head computes k x V/TP logits instead of S x V/TP. The media are `frames` video frames and
    `image_tiles` image tiles (thumbnails included) in one sequence, each one 448px tile that the
    ViT encodes into `num_image_token` feature tokens.
    """

    model: Union[str, ModelConfig]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seq_length: int = 4096
    data_parallel_size: int = 1
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None: enough micro-batches to fill the pipeline
    bf16: bool = True
    recompute_granularity: Optional[str] = None  # None | "selective" | "full"
    recompute_method: Optional[str] = None  # "uniform" | "block" (full recompute)
    recompute_num_layers: Optional[int] = None
    frames: int = 0
    image_tiles: int = 0
    supervised_tokens: Optional[int] = None  # None: DEFAULT_SUPERVISED_TOKENS, at most the sequence
    logits_mask: bool = True
    train_vision: bool = True
    train_projector: bool = True
    train_language: bool = True
    device_memory_gib: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            self.model = resolve_model_config(self.model)

    @property
    def tiles(self) -> int:
        return self.frames + self.image_tiles

    @property
    def supervised(self) -> int:
        """k: labelled positions of one sequence."""
        if self.supervised_tokens is None:
            return min(DEFAULT_SUPERVISED_TOKENS, max(self.seq_length, 1))
        return self.supervised_tokens

    @property
    def world_size(self) -> int:
        return self.parallel.model_parallel_size * self.data_parallel_size

    @property
    def activation_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def micro_batches(self) -> Optional[int]:
        """Micro-batches per step on each data-parallel rank (None when the global batch is not given)."""
        if self.global_batch_size is None:
            return None
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def problems(self) -> List[str]:
        """Every reason training would refuse this configuration, one line each naming the flag."""
        from megatron_vita.training.config import TrainConfig
        from megatron_vita.training.preflight import _recompute_problems, batch_problems, training_layout

        out: List[str] = []
        for flag, value, low in (("--seq-length", self.seq_length, 1), ("--dp", self.data_parallel_size, 1),
                                 ("--micro-batch-size", self.micro_batch_size, 1), ("--frames", self.frames, 0),
                                 ("--image-tiles", self.image_tiles, 0),
                                 ("--supervised-tokens", self.supervised, 1)):
            if value < low:
                out.append(f"{flag} {value}: expected an integer >= {low}")
        if self.device_memory_gib is not None and not self.device_memory_gib > 0:
            out.append(f"--device-memory {self.device_memory_gib}: expected a positive number of GiB")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            out.append(f"--global-batch-size {self.global_batch_size}: expected an integer >= 1")
        par, model = self.parallel, self.model
        world = self.world_size if par.model_parallel_size >= 1 and self.data_parallel_size >= 1 else None
        cfg = TrainConfig(parallel=par, micro_batch_size=self.micro_batch_size,
                          global_batch_size=self.global_batch_size or self.micro_batch_size * self.data_parallel_size,
                          recompute_granularity=self.recompute_granularity, recompute_method=self.recompute_method,
                          recompute_num_layers=self.recompute_num_layers)
        # Training's own checks: the layout against the model, the world and the sequence length
        # (ParallelConfig.problems, with parallel.context.validate.cp_problems), recompute, batch split.
        out += training_layout(cfg, model, world, self.seq_length)[1]
        out += _recompute_problems(cfg)
        if world:
            out += batch_problems(cfg, par, world)
        features = self.tiles * model.num_image_token
        if features > self.seq_length:
            out.append(f"--frames {self.frames} / --image-tiles {self.image_tiles}: {self.tiles} tiles write "
                       f"{features} feature tokens ({model.num_image_token} each), more than --seq-length "
                       f"{self.seq_length}")
        if self.supervised_tokens is not None and self.supervised_tokens > self.seq_length:
            out.append(f"--supervised-tokens {self.supervised_tokens}: more than --seq-length {self.seq_length}")
        return list(dict.fromkeys(out))  # a rule reached twice is reported once

    def validate(self) -> "EstimateInputs":
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self
