"""Parallel layout: how a model is split over devices (Megatron's TP / PP / VPP / CP / SP / DP).

Owns validation of a layout against a model config and a world size, with messages that name
the Megatron flag at fault, so a bad launch fails before any process group is built. Every
problem is reported at once (ConfigError: one line each, printed one per line by the CLI).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_vita.config.model import ModelConfig


class ConfigError(ValueError):
    """Several configuration problems at once: `problems` holds one line each, naming the flag or file."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self):
        return (ConfigError, (self.problems,))


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Model chunks per pipeline rank (Megatron's virtual pipeline size); None = no interleaving.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    # ring (MindSpeed megatron_cp_algo), ulysses, or hybrid (MindSpeed's names are accepted too).
    context_parallel_algo: str = "ring"
    # hybrid: Ulysses ranks inside each ring rank (MindSpeed's --ulysses-degree-in-cp).
    ulysses_degree_in_cp: Optional[int] = None
    # ring: post the send/recv of the next KV block before computing the current one.
    cp_send_recv_overlap: bool = True
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # Uneven pipeline stages (Megatron's --decoder-first/last-pipeline-num-layers).
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    # Megatron's --make-vocab-size-divisible-by: embedding/output rows are padded to a multiple of
    # this times TP. 1 keeps the released 152064 rows unpadded at TP 1/2/4/8 (MindSpeed TP8 layout).
    make_vocab_size_divisible_by: int = 1

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def vpp(self) -> Optional[int]:
        return self.virtual_pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.context_parallel_size

    @property
    def cp_algo(self) -> str:
        """ring | ulysses | hybrid (MindSpeed's names mapped to ours)."""
        from megatron_vita.parallel.context.validate import normalize_algo

        return normalize_algo(self.context_parallel_algo)

    @property
    def cp_sequence_multiple(self) -> int:
        """What every sequence, and every packed document once padded, is a multiple of under CP
        (2*CP load-balanced chunks; times TP's share with sequence parallelism); 1 without CP."""
        from megatron_vita.parallel.context.validate import sequence_multiple

        return sequence_multiple(self.cp, self.tp, self.sequence_parallel) if self.cp > 1 else 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Vocabulary rows of the embedding/output layer: a multiple of the divisor times TP."""
        multiple = self.make_vocab_size_divisible_by * self.tp
        return -(-vocab_size // multiple) * multiple

    def describe(self) -> str:
        """'TP2 PP2 VPP2 CP2 SP' style summary for logs and verify lines."""
        out = f"TP{self.tp} PP{self.pp}" + (f" VPP{self.vpp}" if self.vpp else "")
        if self.cp > 1:
            u = f" U{self.ulysses_degree_in_cp}" if self.ulysses_degree_in_cp else ""
            out += f" CP{self.cp} ({self.context_parallel_algo}{u})"
        out += " SP" if self.sequence_parallel else ""
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if first is not None or last is not None:
            out += f" (first stage {first}, last stage {last} layers)"
        return out

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = {self.tp}*{self.pp}*{self.cp}"
            )
        return world_size // self.model_parallel_size

    def layers_per_stage(self, num_layers: int) -> List[List[int]]:
        """Global layer indices of each (pipeline rank, virtual chunk), in Megatron's order.

        Returns a list indexed by `vp * pp + pp_rank` (the order layers are laid out in).
        """
        stages = self.pp * (self.vpp or 1)
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if first is None and last is None:
            if num_layers % stages:
                raise ValueError(f"--pipeline-model-parallel-size {self.pp}: {num_layers} layers do not split evenly "
                                 f"into {stages} pipeline chunks (PP={self.pp} x VPP={self.vpp or 1}); set "
                                 "--decoder-first-pipeline-num-layers/--decoder-last-pipeline-num-layers")
            sizes = [num_layers // stages] * stages
        else:
            if self.vpp:
                raise ValueError("--decoder-first/last-pipeline-num-layers (uneven pipeline stages) cannot be combined "
                                 "with a virtual pipeline here")
            middle = self.pp - (first is not None) - (last is not None)
            rest = num_layers - (first or 0) - (last or 0)
            if middle < 0 or rest < 0 or (middle and rest % middle) or (not middle and rest):
                raise ValueError(f"--decoder-first-pipeline-num-layers {first} / --decoder-last-pipeline-num-layers "
                                 f"{last}: cannot place {num_layers} layers on {self.pp} pipeline stages")
            each = rest // middle if middle else 0
            sizes = [each] * self.pp
            if first is not None:
                sizes[0] = first
            if last is not None:
                sizes[-1] = last
        out, start = [], 0
        for n in sizes:
            out.append(list(range(start, start + n)))
            start += n
        return out

    def problems(self, model: ModelConfig, world_size: Optional[int] = None,
                 seq_length: Optional[int] = None) -> List[str]:
        """Every way this layout does not fit the model, the world size or the sequence length,
        one line each naming the flag."""
        from megatron_vita.parallel.context.validate import cp_problems

        lm, vis = model.language, model.vision
        errs = []
        for flag, val in [("--tensor-model-parallel-size", self.tp), ("--pipeline-model-parallel-size", self.pp),
                          ("--context-parallel-size", self.cp)]:
            if val < 1:
                errs.append(f"{flag} must be >= 1 (got {val})")
        if self.make_vocab_size_divisible_by < 1:
            errs.append(f"--make-vocab-size-divisible-by must be >= 1 (got {self.make_vocab_size_divisible_by})")
        if errs:
            return errs
        if lm.num_attention_heads % self.tp:
            errs.append(f"--tensor-model-parallel-size {self.tp} does not divide the LLM's "
                        f"{lm.num_attention_heads} attention heads")
        if lm.num_query_groups % self.tp:
            errs.append(f"--tensor-model-parallel-size {self.tp} does not divide the LLM's {lm.num_query_groups} "
                        "KV groups (this project refuses TP > KV groups rather than replicating KV heads)")
        if vis.num_attention_heads % self.tp:
            errs.append(f"--tensor-model-parallel-size {self.tp} does not divide the ViT's "
                        f"{vis.num_attention_heads} heads (the ViT follows the LLM's TP)")
        if lm.ffn_hidden_size % self.tp or vis.ffn_hidden_size % self.tp or model.projector.ffn_hidden_size % self.tp:
            errs.append(f"--tensor-model-parallel-size {self.tp} does not divide an MLP width")
        if self.sequence_parallel and self.tp == 1:
            errs.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
        vpp_ok = True
        if self.vpp is not None:
            if self.pp < 2:
                errs.append("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
                vpp_ok = False
            if self.vpp < 1:
                errs.append(f"virtual pipeline size must be >= 1 (got {self.vpp})")
                vpp_ok = False
        errs += cp_problems(lm.num_attention_heads, lm.num_query_groups, self.tp, self.cp, self.context_parallel_algo,
                            self.ulysses_degree_in_cp, seq_length, self.sequence_parallel)
        if vpp_ok:
            try:
                chunks = self.layers_per_stage(lm.num_layers)
                if any(len(c) == 0 for c in chunks):
                    errs.append(f"--pipeline-model-parallel-size {self.pp}: {lm.num_layers} layers leave an empty "
                                f"pipeline chunk over PP={self.pp} x VPP={self.vpp or 1}")
            except ValueError as e:
                errs.append(str(e))
        if world_size is not None and world_size % self.model_parallel_size:
            errs.append(f"world size {world_size} is not divisible by TP*PP*CP = {self.tp}*{self.pp}*{self.cp} "
                        f"(--tensor-model-parallel-size, --pipeline-model-parallel-size, --context-parallel-size)")
        return errs

    def validate(self, model: ModelConfig, world_size: Optional[int] = None,
                 seq_length: Optional[int] = None) -> "ParallelConfig":
        """Raise one ConfigError listing every problem (one line each), or return self."""
        errs = self.problems(model, world_size, seq_length)
        if errs:
            raise ConfigError(errs)
        return self
