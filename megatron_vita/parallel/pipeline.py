"""Running Long-VITA micro-batches through megatron's pipeline schedules.

The schedules (no pipelining, 1F1B, interleaved) move activations between stages; a forward
step only has to call the model chunk on its micro-batch. The same forward step serves
training (per-token losses) and inference/verification (logits), so the batch contract is
defined once: tokens, position_ids, pixel_values, image_indices, labels, loss_mask, cu_seqlens.
Under context parallelism the micro-batches are first cut into this rank's share
(`shard_microbatches`, parallel.context.batch) and the logits put back together after.
`prepare_microbatches` does that cut on the host and then moves the rank's share to the
platform's device (non-blocking), with the longest packed document read while the boundaries are
still on the host: nothing in a forward step waits on the device for a batch property.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vita.platform import placement


def longest_document(cu_seqlens: torch.Tensor, cu_seqlens_padded: Optional[torch.Tensor] = None) -> int:
    """The longest (padded, when given) document of packed boundaries: megatron's max_seqlen."""
    ref = (cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded).reshape(-1)
    return int((ref[1:] - ref[:-1]).max())


def packed_seq_params(cu_seqlens: Optional[torch.Tensor], cu_seqlens_padded: Optional[torch.Tensor] = None,
                      max_seqlen: Optional[int] = None) -> Optional[PackedSeqParams]:
    """megatron's `thd` description of packed documents (no attention across boundaries).

    Under context parallelism both are the GLOBAL boundaries, real and padded to the CP
    multiple (parallel.context.batch); RoPE and the CP attention leaf read them. `max_seqlen`
    (longest_document, computed on the host by prepare_microbatches) saves a device sync."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(torch.int32).reshape(-1)
    padded = None if cu_seqlens_padded is None else cu_seqlens_padded.to(torch.int32).reshape(-1)
    longest = longest_document(cu, padded) if max_seqlen is None else int(max_seqlen)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
                           cu_seqlens_kv_padded=padded, max_seqlen_q=longest, max_seqlen_kv=longest)


# prepare_microbatches' own key for the host-computed longest document (the loader's
# `max_seqlen` follows the packer's rule, which need not be packed_seq_params').
_MAX_SEQLEN = "_longest_document"


def model_inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Keyword arguments of LongVITAModel.forward from a data batch."""
    tokens = batch["tokens"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return dict(
        input_ids=tokens,
        position_ids=position_ids,
        pixel_values=batch.get("pixel_values"),
        image_indices=batch.get("image_indices"),
        packed_seq_params=packed_seq_params(batch.get("cu_seqlens"), batch.get("cu_seqlens_padded"),
                                            batch.get(_MAX_SEQLEN)),
    )


def _cp_multiple(chunks) -> int:
    from megatron_vita.parallel.context.validate import sequence_multiple

    config = chunks[0].config
    return sequence_multiple(ps.get_context_parallel_world_size(), config.tensor_model_parallel_size,
                             config.sequence_parallel)


def _model_config(chunks):
    module = chunks[0]
    while not hasattr(module, "model_config") and hasattr(module, "module"):
        module = module.module
    return module.model_config


def shard_microbatches(chunks: Sequence[torch.nn.Module],
                       microbatches: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
    """This CP rank's share of every micro-batch (unchanged without context parallelism).

    Pipeline stages exchange activations of one fixed shape, so with PP > 1 every micro-batch
    must split into the same local length (the loader packs for it)."""
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return microbatches
    from megatron_vita.parallel.context.batch import shard_batch

    mc = _model_config(chunks)
    out = [shard_batch(mb, ps.get_context_parallel_rank(), cp, _cp_multiple(chunks), mc.tokens.context_ids,
                       mc.num_image_token) for mb in microbatches]
    lengths = sorted({mb["tokens"].shape[1] for mb in out})
    if len(lengths) > 1 and ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError(f"micro-batches of one step split into local lengths {lengths} over CP {cp}: pipeline "
                         "stages need one length (documents padded to the CP multiple outgrew --seq-length)")
    return out


def prepare_microbatches(chunks: Sequence[torch.nn.Module],
                         microbatches: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
    """This rank's share of every micro-batch (shard_microbatches, on the host), on the platform's
    device: tensors moved non-blocking (asynchronous from a pinned loader batch), the longest
    packed document computed before the move."""
    out = []
    for mb in shard_microbatches(chunks, microbatches):
        if mb.get("cu_seqlens") is not None and mb["cu_seqlens"].device.type == "cpu":
            mb = dict(mb, **{_MAX_SEQLEN: longest_document(mb["cu_seqlens"], mb.get("cu_seqlens_padded"))})
        out.append(placement.to_device(mb))
    return out


def run_schedule(chunks: Sequence[torch.nn.Module], microbatches: List[Dict[str, torch.Tensor]],
                 forward_step: Callable, forward_only: bool, seq_length: Optional[int] = None):
    """megatron's forward(-backward) over this rank's chunks; returns the schedule's outputs."""
    schedule = get_forward_backward_func()
    tokens = microbatches[0]["tokens"]
    iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        # The global sequence length: megatron divides by CP and (under SP) by TP itself; under
        # CP the micro-batches are already this rank's share (parallel.context.batch).
        seq_length=seq_length or tokens.shape[1] * ps.get_context_parallel_world_size(),
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def _pad_to_multiple(batch: Dict[str, torch.Tensor], multiple: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad tokens (causal attention: earlier positions are unaffected) to a length multiple."""
    s = batch["tokens"].shape[1]
    extra = -s % multiple
    if not extra:
        return batch
    out = dict(batch)
    out["tokens"] = torch.nn.functional.pad(batch["tokens"], (0, extra), value=pad_id)
    if batch.get("position_ids") is not None:
        tail = batch["position_ids"][:, -1:] + torch.arange(1, extra + 1, device=batch["position_ids"].device)
        out["position_ids"] = torch.cat([batch["position_ids"], tail], dim=1)
    return out


def forward_only(chunks: Sequence[torch.nn.Module], microbatches: List[Dict[str, torch.Tensor]],
                 pad_id: int = 0) -> Optional[List[torch.Tensor]]:
    """Full-vocabulary logits [b, s, V] per micro-batch on the last stage; None elsewhere.

    Sequences are right-padded as sequence parallelism needs (a multiple of TP) and the padding
    is cut from the logits; the interleaved schedule needs at least PP micro-batches, so the
    list is repeated to that count and the extra outputs dropped.
    """
    config = chunks[0].config
    lengths = [mb["tokens"].shape[1] for mb in microbatches]
    cp = ps.get_context_parallel_world_size()
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    padded = prepare_microbatches(chunks, [_pad_to_multiple(mb, multiple, pad_id) for mb in microbatches]
                                  if cp == 1 else microbatches)
    if len({mb["tokens"].shape[1] for mb in padded}) != 1:
        raise ValueError(f"micro-batches of one call must have equal lengths, got {lengths}")
    n = len(padded)
    if len(chunks) > 1:
        pp = ps.get_pipeline_model_parallel_world_size()
        padded = (padded * pp)[:max(pp, -(-n // pp) * pp)]

    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model(**model_inputs(batch), runtime_gather_output=True)
        return out, lambda o: (o.new_zeros(()), {"logits": o.detach()})

    for c in chunks:
        c.eval()
    with torch.no_grad():
        outputs = run_schedule(chunks, padded, step, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = [o["logits"] for o in outputs[:n]]
    if cp > 1:
        logits = [_gather_over_cp(part, mb, _cp_multiple(chunks)) for part, mb in zip(logits, microbatches)]
    return [x[:, :length] for x, length in zip(logits, lengths)]


def _gather_over_cp(part: torch.Tensor, batch: Dict[str, torch.Tensor], multiple: int) -> torch.Tensor:
    """Every CP rank's logits [b, s_local, V] -> the micro-batch's [b, s, V] in global order."""
    from megatron_vita.parallel.context.batch import unshard_logits

    group = ps.get_context_parallel_group()
    parts = [torch.empty_like(part) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, part.contiguous(), group=group)
    return unshard_logits(parts, batch, multiple)
