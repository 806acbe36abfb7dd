"""One optimizer step of Long-VITA on megatron-core: DDP wrapping, the loss, the schedule.

The loss is Long-VITA's: token-mean cross entropy over the supervised tokens of each
micro-batch, averaged over the micro-batches of the step and over data-parallel ranks (megatron
divides each micro-batch loss by the number of micro-batches and DDP averages gradients).
Gradients are clipped by the global norm (all model-parallel ranks), as Megatron does.

Under context parallelism each CP rank holds a share of every sequence (parallel.context.batch):
the token count is all-reduced over the CP group, each rank's loss is its own sum over that
global count, megatron's schedule multiplies it by CP and DDP averages over DP x CP, so the
gradient equals that of CP 1 (Megatron-LM's pretrain_gpt does the same).

Placement: the micro-batches arrive on the host; each rank's share goes to the platform's device
(`pipeline.prepare_microbatches`), and every tensor a collective reduces here is on that device
(nccl / hccl reduce nothing else).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from megatron_vita.parallel.pipeline import model_inputs, prepare_microbatches, run_schedule
from megatron_vita.platform import placement


def wrap_ddp(chunks: Sequence[torch.nn.Module], use_distributed_optimizer: bool = False,
             grad_reduce_in_fp32: bool = True) -> List[DistributedDataParallel]:
    """megatron DDP around each chunk (frozen parameters get no gradient buffer)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer, bucket_size=None,
    )
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                # Megatron's convention: only the first chunk's buckets start synced.
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.grad_sync_func = None
    config.param_sync_func = None
    return wrapped


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Token mean of one micro-batch; the reduced dict carries (loss, this rank's supervised tokens)."""
    total = per_token_loss.float().sum()
    tokens = loss_mask.float().sum()
    if ps.get_context_parallel_world_size() == 1:
        loss = total / tokens.clamp(min=1.0)
        return loss, {"lm loss": torch.stack([loss.detach(), tokens.detach()])}
    sums = torch.stack([total.detach(), tokens.detach()])
    torch.distributed.all_reduce(sums, group=ps.get_context_parallel_group())
    loss = total / sums[1].clamp(min=1.0)
    return loss, {"lm loss": torch.stack([sums[0] / sums[1].clamp(min=1.0), tokens.detach()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(**model_inputs(batch), labels=batch["labels"], loss_mask=batch["loss_mask"])
    return out, partial(loss_func, batch["loss_mask"])


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and data-parallel ranks (same on every rank)
    grad_norm: Optional[float]
    supervised_tokens: int  # over the whole global batch
    skipped: bool


def _broadcast_from_last_stage(values: torch.Tensor) -> torch.Tensor:
    if ps.get_pipeline_model_parallel_world_size() > 1:
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            values = torch.zeros_like(values)
        torch.distributed.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    return values


def train_step(ddp_chunks: Sequence[DistributedDataParallel], optimizer,
               microbatches: List[Dict[str, torch.Tensor]]) -> StepResult:
    """Forward/backward over this DP rank's micro-batches (whole sequences, cut per CP rank here),
    then one optimizer step."""
    for m in ddp_chunks:
        m.train()
        m.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(ddp_chunks, prepare_microbatches(ddp_chunks, microbatches), forward_step,
                           forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    stats = torch.zeros(2, dtype=placement.collective_dtype(torch.float64), device=placement.device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        per_mb = torch.stack([o["lm loss"] for o in outputs]).to(stats.dtype)
        stats = torch.stack([per_mb[:, 0].mean(), per_mb[:, 1].sum()])
        dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(stats, group=dp_group)
        stats[0] /= torch.distributed.get_world_size(dp_group)
    stats = _broadcast_from_last_stage(stats)
    return StepResult(loss=stats[0].item(), grad_norm=None if grad_norm is None else float(grad_norm),
                      supervised_tokens=int(stats[1].item()), skipped=not ok)
