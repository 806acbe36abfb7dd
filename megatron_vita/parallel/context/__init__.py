"""Context parallelism (CP) for long sequences: ring, Ulysses and hybrid attention in plain torch.

megatron-core 0.12.1 only runs CP through TransformerEngine's attention, so this package is the
project's own, on every backend and over any torch.distributed group (gloo on the CPU):
  layout     which tokens each CP rank holds (2*CP load-balanced chunks per document), its inverse
  blocks     tiled block attention with (out, lse), online-softmax merge, recomputing backward
  ring       ring attention (megatron_cp_algo) as an autograd Function, send/recv overlap
  attention  the Ulysses all-to-all (ulysses_cp_algo), the three algorithms behind one call
             (hybrid_cp_algo: Ulysses inside ring) and their process groups
  validate   algorithm names and the layout checks made before any rank starts
Inputs are [B, heads, s_local, d]; the core-attention spec leaf adapts megatron's [s, b, h, d] / thd.
"""
from megatron_vita.parallel.context.attention import CPGroups, context_parallel_attention, new_cp_groups
from megatron_vita.parallel.context.blocks import (
    DEFAULT_TILE, Segment, attention_backward_, attention_forward_, merge_, new_accumulator,
)
from megatron_vita.parallel.context.layout import (
    SeqLayout, gather_from_ranks, pad_documents, split_for_rank, unpad_documents,
)
from megatron_vita.parallel.context.ring import RingAttention, RingPlan, ring_attention
from megatron_vita.parallel.context.validate import (
    ALGOS, cp_problems, normalize_algo, sequence_multiple, ulysses_degree_for,
)

__all__ = [
    "ALGOS", "CPGroups", "DEFAULT_TILE", "RingAttention", "RingPlan", "Segment", "SeqLayout",
    "attention_backward_", "attention_forward_", "context_parallel_attention", "cp_problems",
    "gather_from_ranks", "merge_", "new_accumulator", "new_cp_groups", "normalize_algo",
    "pad_documents", "ring_attention", "sequence_multiple", "split_for_rank", "ulysses_degree_for",
    "unpad_documents",
]
