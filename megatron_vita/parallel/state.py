"""megatron-core process groups for a ParallelConfig, and the position of this rank in them.

A thin layer over megatron.core.parallel_state so that callers speak in ParallelConfig terms
(and tests can switch layouts inside one set of processes: destroy, then initialize again).
It also owns the context-parallel sub-groups (Ulysses / ring) of the layout's CP groups, which
megatron-core does not make: the CP attention leaf reads them with `cp_groups()`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from megatron_vita import platform
from megatron_vita.config.parallel import ParallelConfig


@dataclass(frozen=True)
class RankInfo:
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    dp_size: int


def initialize_parallel(par: ParallelConfig, seed: int = 1234) -> RankInfo:
    """Build megatron's groups for `par` over the default process group and seed its RNGs."""
    world = torch.distributed.get_world_size()
    par.data_parallel_size(world)  # raises a clear error when the world does not fit the layout
    destroy_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
    )
    _make_cp_groups(par)
    platform.current().manual_seed(seed)  # CPU, accelerator and megatron tracker streams
    return rank_info()


_CP = {"groups": None, "overlap": True}


def _make_cp_groups(par: ParallelConfig) -> None:
    """The Ulysses / ring sub-groups of every CP group (collective: every rank calls it)."""
    if par.cp == 1:
        return
    from megatron_vita.parallel.context.attention import new_cp_groups

    mine = torch.distributed.get_process_group_ranks(ps.get_context_parallel_group())
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, sorted(mine))
    rank_lists = sorted({tuple(r) for r in every})
    groups = new_cp_groups(rank_lists, par.cp_algo, par.ulysses_degree_in_cp)
    if groups.rank != ps.get_context_parallel_rank():
        raise AssertionError(f"CP rank {groups.rank} of the Ulysses/ring groups differs from megatron's "
                             f"{ps.get_context_parallel_rank()}")
    _CP.update(groups=groups, overlap=par.cp_send_recv_overlap)


def cp_groups():
    """This rank's context-parallel groups (parallel.context.CPGroups); None without CP."""
    return _CP["groups"]


def cp_send_recv_overlap() -> bool:
    return bool(_CP["overlap"])


def rank_info() -> RankInfo:
    return RankInfo(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups so that another layout can be built in the same processes."""
    _CP.update(groups=None, overlap=True)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


@contextmanager
def parallel_layout(par: ParallelConfig, seed: int = 1234):
    """`with parallel_layout(par) as info:` — groups exist inside the block only."""
    info = initialize_parallel(par, seed)
    try:
        yield info
    finally:
        destroy_parallel()


@contextmanager
def virtual_pipeline_rank(vp: int):
    """Megatron reads the chunk being built from global state; set it for the block."""
    if ps.get_virtual_pipeline_model_parallel_world_size() is None:
        yield
        return
    previous = ps.get_virtual_pipeline_model_parallel_rank()
    ps.set_virtual_pipeline_model_parallel_rank(vp)
    try:
        yield
    finally:
        ps.set_virtual_pipeline_model_parallel_rank(previous)
