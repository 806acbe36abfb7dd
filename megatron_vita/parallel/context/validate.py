"""Which context-parallel layouts can run: algorithm names and the checks made before any rank starts.

Owns the rules, each reported as one line naming the flags and the numbers:
 - ring (MindSpeed megatron_cp_algo): every sequence is split into 2*CP load-balanced chunks, so
   its length must be a multiple of 2*CP; with sequence parallelism each rank's share also splits
   over TP, so a multiple of CP * lcm(2, TP). Packed documents are padded to that multiple each.
 - ulysses (ulysses_cp_algo): the query heads of a TP rank split over all CP ranks (KV heads that
   do not are repeated, which always works). Its tokens use the same load-balanced split.
 - hybrid (hybrid_cp_algo): Ulysses over --ulysses-degree-in-cp ranks (> 1, dividing CP, leaving
   at least 2 ring ranks), whose degree must divide the query heads of a TP rank.
E.g. Qwen2.5-14B (40 query / 8 KV heads) at TP 8 holds 5 query heads per rank: only ring, or a
Ulysses degree dividing 5, is possible.
"""
from __future__ import annotations

import math
from typing import List, Optional

ALGOS = ("ring", "ulysses", "hybrid")
ALIASES = {"ring": "ring", "megatron_cp_algo": "ring", "ulysses": "ulysses", "ulysses_cp_algo": "ulysses",
           "hybrid": "hybrid", "hybrid_cp_algo": "hybrid"}


def normalize_algo(name: str) -> str:
    """ring | ulysses | hybrid from our names or MindSpeed's (megatron_cp_algo, ulysses_cp_algo, hybrid_cp_algo)."""
    try:
        return ALIASES[name]
    except (KeyError, TypeError):
        raise ValueError(_unknown_algo(name)) from None


def ulysses_degree_for(algo: str, cp: int, ulysses_degree: Optional[int] = None) -> int:
    """Ranks in each Ulysses group: 1 for ring, all CP ranks for ulysses, the given degree for hybrid."""
    algo = normalize_algo(algo)
    if algo == "ring":
        return 1
    if algo == "ulysses":
        return cp
    if not ulysses_degree or cp % ulysses_degree:
        raise ValueError(f"--ulysses-degree-in-cp {ulysses_degree} must divide --context-parallel-size {cp}")
    return ulysses_degree


def _unknown_algo(name) -> str:
    return (f"--context-parallel-algo {name!r}: use ring, ulysses or hybrid "
            "(or MindSpeed's megatron_cp_algo, ulysses_cp_algo, hybrid_cp_algo)")


def sequence_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What every sequence (and every packed document, once padded) must be a multiple of."""
    return cp * math.lcm(2, tp) if sequence_parallel else 2 * cp


def _hybrid_degrees(cp: int, heads_per_rank: int) -> List[int]:
    return [u for u in range(2, cp // 2 + 1) if cp % u == 0 and heads_per_rank % u == 0]


def cp_problems(num_heads: int, num_kv_heads: int, tp: int, cp: int, algo: str,
                ulysses_degree: Optional[int] = None, seq_length: Optional[int] = None,
                sequence_parallel: bool = False) -> List[str]:
    """Every reason this context-parallel layout cannot run, one line each ([] when it can).

    Head counts are the model's (all TP ranks); that TP itself divides them is
    ParallelConfig's check, so head rules are skipped when it does not."""
    if cp < 1:
        return [f"--context-parallel-size must be >= 1 (got {cp})"]
    if algo not in ALIASES:
        return [_unknown_algo(algo)]
    algo = ALIASES[algo]
    flag = f"--context-parallel-algo {algo} with --context-parallel-size {cp}"
    if cp == 1:
        if ulysses_degree not in (None, 1):
            return [f"--ulysses-degree-in-cp {ulysses_degree} needs --context-parallel-size > 1 (got 1)"]
        return []
    errs = []
    heads_ok = tp >= 1 and num_heads % tp == 0 and num_kv_heads % tp == 0
    hq = num_heads // tp if heads_ok else None
    per_rank = f"each of the {tp} tensor-parallel ranks holds {num_heads}/{tp} = {hq} query heads"
    if algo == "ring" and ulysses_degree not in (None, 1):
        errs.append(f"--ulysses-degree-in-cp {ulysses_degree} only applies to --context-parallel-algo hybrid "
                    f"(ring uses 1)")
    if algo == "ulysses":
        if ulysses_degree not in (None, cp):
            errs.append(f"--ulysses-degree-in-cp {ulysses_degree} only applies to --context-parallel-algo hybrid "
                        f"(ulysses uses all {cp} CP ranks)")
        if heads_ok and hq % cp:
            fits = _hybrid_degrees(cp, hq)
            alt = f", or hybrid with --ulysses-degree-in-cp {' or '.join(map(str, fits))}" if fits else ""
            errs.append(f"{flag}: {per_rank}, which do not split over {cp} Ulysses ranks; use ring{alt}")
    if algo == "hybrid":
        u = ulysses_degree
        if u is None:
            errs.append(f"{flag} needs --ulysses-degree-in-cp (the Ulysses ranks inside each ring rank)")
        elif u < 2 or cp % u or cp // u < 2:
            errs.append(f"--ulysses-degree-in-cp {u}: hybrid needs a degree > 1 that divides --context-parallel-size "
                        f"{cp} and leaves at least 2 ring ranks (use ring or ulysses otherwise)")
        elif heads_ok and hq % u:
            fits = _hybrid_degrees(cp, hq)
            alt = f"; degrees that fit: {', '.join(map(str, fits))}" if fits else "; no Ulysses degree fits: use ring"
            errs.append(f"--ulysses-degree-in-cp {u} with --tensor-model-parallel-size {tp}: {per_rank}, "
                        f"which do not split over {u} Ulysses ranks{alt}")
    if seq_length is not None:
        m = sequence_multiple(cp, tp, sequence_parallel)
        if seq_length < 1 or seq_length % m:
            why = (f"CP * lcm(2, TP) = {cp} * {math.lcm(2, tp)}: 2*CP load-balanced chunks, and each rank's share "
                   f"splits over --tensor-model-parallel-size {tp} with --sequence-parallel" if sequence_parallel
                   else "2*CP: the sequence is split into 2*CP load-balanced chunks")
            errs.append(f"--seq-length {seq_length} with --context-parallel-size {cp} must be a multiple of {m} ({why})")
    return errs
