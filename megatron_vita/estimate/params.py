"""Parameters one device holds and what they cost: weights, gradients, optimizer state.

Owns the per-rank parameter counts of every Long-VITA part as this project builds them on
megatron-core (models/): each tensor-parallel linear holds 1/TP of its rows or columns, norms,
layer scales, RowParallelLinear biases and the ViT embeddings are replicated, the vocabulary is
padded as ParallelConfig.padded_vocab_size says. A pipeline stage holds its LLM layers; the first
stage adds the embedding, the ViT and the projector, the last the final norm and the output layer.
`tests/estimate/test_saved_tensors.py` checks these counts against models the builder really built.

Their memory, as megatron-core 0.12.1 keeps it with this project's DDP and optimizer
(training/engine.py, training/optimizer.py):
  weights    every parameter in the parameter dtype (bf16 or fp32), frozen ones included;
  gradients  DDP's fp32 main_grad buffer (grad_reduce_in_fp32) for trained parameters only, full
             size on every rank (the distributed optimizer reduce-scatters into its shard of it);
  optimizer  Adam's m and v in fp32, plus an fp32 master copy when the parameters are bf16 (fp32
             parameters are their own master); with --use-distributed-optimizer divided over the
             data-parallel group with context parallelism (DP x CP), as megatron shards it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

from megatron_vita.config.model import ModelConfig
from megatron_vita.config.parallel import ParallelConfig


@dataclass(frozen=True)
class ParamGroup:
    """Parameters of one part on one rank."""

    name: str  # "language layers", "embedding", "output layer", "vision", "projector", ...
    numel: int
    trainable: bool


def llm_layer_params(model: ModelConfig, tp: int) -> int:
    """One Qwen2 decoder layer on one TP rank: two RMSNorms, fused QKV (+bias), proj, SwiGLU fc1/fc2."""
    lm = model.language
    d = lm.kv_channels
    qkv_rows = (lm.num_attention_heads + 2 * lm.num_query_groups) * d // tp
    return (2 * lm.hidden_size  # input_layernorm, pre_mlp_layernorm
            + qkv_rows * lm.hidden_size + qkv_rows  # linear_qkv weight + bias (QKV bias only)
            + lm.hidden_size * lm.num_attention_heads * d // tp  # linear_proj, no bias
            + 2 * lm.ffn_hidden_size // tp * lm.hidden_size  # linear_fc1 [gate; up]
            + lm.hidden_size * lm.ffn_hidden_size // tp)  # linear_fc2


def vit_layer_params(model: ModelConfig, tp: int) -> int:
    """One InternViT layer on one TP rank (biases on every linear; row-parallel biases replicated)."""
    v = model.vision
    c, f = v.hidden_size, v.ffn_hidden_size
    qkv = 3 * c // tp * c + (3 * c // tp if v.qkv_bias else 0)
    return (2 * c + qkv + c * c // tp + c  # LN1, qkv, proj (+ full bias)
            + 2 * c + f // tp * c + f // tp + c * f // tp + c  # LN2, fc1 (+bias), fc2 (+ full bias)
            + 2 * c)  # ls1, ls2


def vit_embedding_params(model: ModelConfig) -> int:
    """Patch conv (with bias), CLS token and learned position embedding (replicated over TP)."""
    v = model.vision
    c = v.hidden_size
    return c * v.num_channels * v.patch_size ** 2 + c + c + v.seq_length * c


def projector_params(model: ModelConfig, tp: int) -> int:
    """LayerNorm(4C) -> column-parallel fc1 -> GELU -> row-parallel fc2 (no biases)."""
    cin, mid = model.projector_input_size, model.projector.ffn_hidden_size
    return 2 * cin + mid // tp * cin + model.language.hidden_size * (mid // tp)


def vocab_rows(model: ModelConfig, par: ParallelConfig) -> int:
    """Rows of the embedding / output layer on one TP rank (padded vocabulary / TP)."""
    return par.padded_vocab_size(model.language.vocab_size) // par.tp


def stage_layers(model: ModelConfig, par: ParallelConfig, pp_rank: int) -> int:
    """LLM layers held by pipeline rank `pp_rank` (all its virtual chunks)."""
    chunks = par.layers_per_stage(model.language.num_layers)
    return sum(len(chunks[vp * par.pp + pp_rank]) for vp in range(par.vpp or 1))


def stage_params(model: ModelConfig, par: ParallelConfig, pp_rank: int, train_vision: bool = True,
                 train_projector: bool = True, train_language: bool = True) -> List[ParamGroup]:
    """Every parameter group pipeline rank `pp_rank` holds, with whether it trains."""
    tp, h = par.tp, model.language.hidden_size
    groups = [ParamGroup("language layers", stage_layers(model, par, pp_rank) * llm_layer_params(model, tp),
                         train_language)]
    if pp_rank == 0:
        groups.append(ParamGroup("embedding", vocab_rows(model, par) * h, train_language))
        groups.append(ParamGroup("vision", vit_embedding_params(model)
                                 + model.vision.num_layers * vit_layer_params(model, tp), train_vision))
        groups.append(ParamGroup("projector", projector_params(model, tp), train_projector))
    if pp_rank == par.pp - 1:
        groups.append(ParamGroup("final norm + output layer", h + vocab_rows(model, par) * h, train_language))
    return groups


def static_terms(inputs, pp_rank: int) -> List[Tuple[str, int, str]]:
    """(name, bytes, detail) of weights, gradients and optimizer state on pipeline rank `pp_rank`
    for an estimate.inputs.EstimateInputs."""
    par = inputs.parallel
    groups = stage_params(inputs.model, par, pp_rank, inputs.train_vision, inputs.train_projector,
                          inputs.train_language)
    total = sum(g.numel for g in groups)
    trained = sum(g.numel for g in groups if g.trainable)
    param_bytes = 2 if inputs.bf16 else 4
    shards = inputs.data_parallel_size * par.cp if par.use_distributed_optimizer else 1
    state = 12 if inputs.bf16 else 8  # fp32 master (bf16 only) + m + v
    names = ", ".join(f"{g.name} {g.numel / 1e6:.1f}M{'' if g.trainable else ' frozen'}" for g in groups)
    return [
        ("weights", total * param_bytes, f"{total / 1e6:.1f}M params x {param_bytes} B ({names})"),
        ("gradients", trained * 4, f"fp32 main_grad of {trained / 1e6:.1f}M trained params"),
        ("optimizer", math.ceil(trained * state / shards),
         f"{state} B/param (Adam m, v{', fp32 master' if inputs.bf16 else ''})"
         + (f" / {shards} (distributed over DP x CP)" if shards > 1 else "")),
    ]
