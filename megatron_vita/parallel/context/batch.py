"""A micro-batch under context parallelism: each CP rank's share of it, and logits put back together.

Owns the per-rank batch (megatron's get_batch_on_this_cp_rank only knows unpacked sequences and
no images):
 - tokens, pre-shifted labels, loss mask and position ids (true positions: within the document
   with reset packing, in the sequence without) in the load-balanced order of layout.py. With
   cu_seqlens (packing with reset) every document is padded to the CP multiple and split on its
   own, so no attention crosses a document; without, each row is one causal sequence.
 - the loader packs for CP (data.packing: `align`): every document already starts at a multiple
   of the CP multiple and `cu_seqlens_padded` says so; the sequence then keeps its length, which
   pipeline stages need (they exchange fixed-size activations). Any other batch is padded here,
   document by document; the slack of the sequence goes to the last document, and the
   sequence grows only when the padding does not fit in it.
 - images and video frames without replication: the rank keeps only the tiles with at least one
   feature token in its share, and `image_indices` [2, n, T] gives, per kept tile, the local
   position of each feature token or -1 where a neighbour holds it (the model writes only its
   own). A tile straddling a chunk boundary runs on both neighbours, nothing more.
 - `cu_seqlens` / `cu_seqlens_padded`: the GLOBAL real and padded document boundaries (the
   convention of megatron's PackedSeqParams under CP, read by the CP attention leaf and RoPE).
Labels stay pre-shifted, so each rank's loss covers exactly its own supervised positions.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from megatron_vita.parallel.context.layout import SeqLayout, gather_from_ranks, pad_documents, split_for_rank

IGNORE_INDEX = -100
_PER_TOKEN = {"tokens": 0, "labels": IGNORE_INDEX, "loss_mask": 0}


def batch_layout(batch: Dict[str, torch.Tensor], degree: int, multiple: int) -> SeqLayout:
    """The layout of this micro-batch split over `degree` ranks, every document a multiple of `multiple`."""
    seq = batch["tokens"].shape[1]
    target = -(-seq // multiple) * multiple
    cu = batch.get("cu_seqlens")
    if cu is None:
        return SeqLayout((seq,), (target,), degree)
    if batch["tokens"].shape[0] != 1:
        raise ValueError("cu_seqlens (packing with reset) needs micro-batch size 1")
    bounds = [int(x) for x in cu.reshape(-1).tolist()]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if batch.get("cu_seqlens_padded") is not None:
        pb = [int(x) for x in batch["cu_seqlens_padded"].reshape(-1).tolist()]
        padded = [b - a for a, b in zip(pb, pb[1:])]
        if len(padded) != len(lengths) or pb[-1] != seq or any(p % multiple for p in padded):
            raise ValueError(f"cu_seqlens_padded {pb}: documents are not padded to multiples of {multiple} over the "
                             f"{seq}-token sequence (packed for another context-parallel layout?)")
        return SeqLayout(tuple(lengths), tuple(padded), degree)
    if sum(lengths) != seq or min(lengths, default=0) < 1:
        raise ValueError(f"cu_seqlens {bounds} do not cover the sequence of {seq} tokens with non-empty documents")
    padded = [-(-n // multiple) * multiple for n in lengths]
    slack = target - sum(padded)
    if slack > 0:
        padded[-1] += slack  # keep the global length: pipeline stages exchange fixed-size tensors
    return SeqLayout(tuple(lengths), tuple(padded), degree)


def _prepadded(batch) -> bool:
    return batch.get("cu_seqlens") is not None and batch.get("cu_seqlens_padded") is not None


def shard_batch(batch: Dict[str, torch.Tensor], rank: int, degree: int, multiple: int,
                context_ids: Optional[Sequence[int]] = None, num_image_token: Optional[int] = None
                ) -> Dict[str, torch.Tensor]:
    """CP rank `rank`'s share of a micro-batch (see the module docstring). Keys the split does not
    concern (num_samples, samples, ...) are passed through. `context_ids` / `num_image_token` find
    the feature tokens when the batch has no `image_indices`."""
    layout = batch_layout(batch, degree, multiple)
    reset = batch.get("cu_seqlens") is not None
    out = dict(batch)
    prepadded = _prepadded(batch)
    for key, fill in _PER_TOKEN.items():
        if batch.get(key) is not None:
            x = batch[key] if prepadded else pad_documents(batch[key], layout, dim=1, value=fill)
            out[key] = split_for_rank(x, layout, rank, dim=1)
    rows = batch["tokens"].shape[0]
    out["position_ids"] = layout.position_ids(rank, reset).to(batch["tokens"].device).unsqueeze(0).expand(rows, -1)
    if reset:
        # On the batch's device like every other field (the training path cuts on the host and
        # moves the share after: pipeline.prepare_microbatches).
        device = batch["tokens"].device
        out["cu_seqlens"] = torch.tensor(layout.cu_seqlens(padded=False), dtype=torch.int32, device=device)
        out["cu_seqlens_padded"] = torch.tensor(layout.cu_seqlens(padded=True), dtype=torch.int32, device=device)
        out["max_seqlen"] = max(layout.padded)
    pixels = batch.get("pixel_values")
    if pixels is not None and pixels.shape[0] > 0:
        indices = batch.get("image_indices")
        if indices is None:
            if context_ids is None or num_image_token is None:
                raise ValueError("a batch without image_indices needs context_ids and num_image_token to be split")
            from megatron_vita.models.common.visual_tokens import context_token_indices

            indices = context_token_indices(batch["tokens"], context_ids, num_image_token)
        keep, local = _tiles_on_rank(indices, layout, rank, prepadded)
        out["pixel_values"] = pixels[keep]
        out["image_indices"] = local
    return out


def _tiles_on_rank(indices: torch.Tensor, layout: SeqLayout, rank: int, prepadded: bool):
    """(tiles with a feature token on `rank`, their [2, n_kept, T] local indices with -1 elsewhere)."""
    shift = torch.zeros(layout.total, dtype=torch.long)
    if not prepadded:  # batch positions are real positions: move them to the padded sequence
        real_starts = layout.cu_seqlens(padded=False)
        for a, b, p in zip(real_starts, real_starts[1:], layout.cu_seqlens(padded=True)):
            shift[a:b] = p - a
    owner = torch.empty(layout.total, dtype=torch.long)
    local = torch.empty(layout.total, dtype=torch.long)
    for r in range(layout.degree):
        idx = layout.indices(r)
        owner[idx] = r
        local[idx] = torch.arange(idx.numel())
    pos = indices[1].long().cpu()
    pos = pos + shift[pos]
    mine = owner[pos] == rank  # [n, T]
    keep = mine.any(dim=1)
    local_pos = torch.where(mine, local[pos], torch.full_like(pos, -1))[keep]
    out = torch.stack([indices[0].long().cpu()[keep], local_pos]).to(indices.device)
    return keep.to(indices.device), out


def unshard_logits(parts: List[torch.Tensor], batch: Dict[str, torch.Tensor], multiple: int) -> torch.Tensor:
    """The CP ranks' logits [b, s_local, V] (by CP rank) -> [b, s, V] in the order of the global batch."""
    from megatron_vita.parallel.context.layout import unpad_documents

    layout = batch_layout(batch, len(parts), multiple)
    full = gather_from_ranks(parts, layout, dim=1)
    return full if _prepadded(batch) else unpad_documents(full, layout, dim=1)

