"""Packing documents into fixed-length sequences, and the tensors of a packed micro-batch.

Owns two things:

- `Packer`: the Long-VITA buffer rule over sample references (indices and lengths only, so its
  state is small and goes into checkpoints). A document goes to the shortest buffer if it fits;
  otherwise the longest buffer is emitted (to be padded to the sequence length) and the document
  starts a new one. `per_source`: one buffer per dataset file (stages 1-2); `shared`: N buffers
  for all datasets (stages 3-4, N = 2); `none`: every document is its own sequence. With
  `align` > 1 (context parallelism: each document is later padded to a multiple of 2*CP, see
  parallel.context.batch) a document takes its padded length in the buffer, so every pack
  still fits the sequence once padded.
- `collate_packs`: tokens, pre-shifted labels, loss mask, position ids (reset per document or
  continuous), cu_seqlens (with reset; trailing padding is its own final segment) and the
  positions of every visual feature token (`image_indices`, the released HF argument). With
  `align` > 1 and reset, each document starts at a multiple of `align` (its padding follows it)
  and `cu_seqlens_padded` gives the padded boundaries next to the real lengths' `cu_seqlens`
  (TransformerEngine's convention), which is what context parallelism splits.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron_vita.data.template import IGNORE_INDEX

# (dataset index, record index, token length, max-frames override or 0)
SampleRef = Tuple[int, int, int, int]


class Packer:
    """Buffers of SampleRefs; `add` returns the packs it emits (zero or one)."""

    def __init__(self, mode: str, seq_length: int, num_buffers: int = 2, align: int = 1):
        if mode not in ("per_source", "shared", "none"):
            raise ValueError(f"packing mode must be per_source, shared or none, got {mode!r}")
        if align < 1 or seq_length % align:
            raise ValueError(f"sequence length {seq_length} is not a multiple of the packing alignment {align} "
                             "(under context parallelism: 2*CP, times TP's share with sequence parallelism)")
        self.mode = mode
        self.seq_length = seq_length
        self.num_buffers = num_buffers
        self.align = align
        # key -> list of refs; per_source keys are dataset indices, shared keys 0..N-1.
        self.buffers: Dict[int, List[SampleRef]] = {}
        # key -> tokens in that buffer (kept incrementally: a 1M-token buffer holds thousands of refs).
        self._lens: Dict[int, int] = {}

    def _len(self, key: int) -> int:
        return self._lens.get(key, 0)

    def _cost(self, ref: SampleRef) -> int:
        """Tokens the document takes in a pack: its length, padded to the alignment."""
        return -(-ref[2] // self.align) * self.align

    def _append(self, key: int, ref: SampleRef) -> None:
        self.buffers.setdefault(key, []).append(ref)
        self._lens[key] = self._lens.get(key, 0) + self._cost(ref)

    def _replace(self, key: int, ref: SampleRef) -> List[SampleRef]:
        out = self.buffers.get(key, [])
        self.buffers[key] = [ref]
        self._lens[key] = self._cost(ref)
        return out

    def add(self, ref: SampleRef) -> List[List[SampleRef]]:
        if ref[2] > self.seq_length:
            raise ValueError(f"document of {ref[2]} tokens cannot be packed into {self.seq_length}")
        if self.mode == "none":
            return [[ref]]
        cost = self._cost(ref)
        if self.mode == "per_source":
            key = ref[0]
            if self._len(key) + cost <= self.seq_length:
                self._append(key, ref)
                return []
            return [self._replace(key, ref)]
        lens = [self._len(k) for k in range(self.num_buffers)]
        shortest = min(range(self.num_buffers), key=lambda k: (lens[k], k))
        if lens[shortest] + cost <= self.seq_length:
            self._append(shortest, ref)
            return []
        longest = max(range(self.num_buffers), key=lambda k: (lens[k], -k))
        return [self._replace(longest, ref)]

    def state_dict(self) -> dict:
        return {"buffers": [[k, [list(r) for r in v]] for k, v in sorted(self.buffers.items()) if v]}

    def load_state_dict(self, d: dict) -> None:
        self.buffers = {int(k): [tuple(int(x) for x in r) for r in v] for k, v in d["buffers"]}
        self._lens = {k: sum(self._cost(r) for r in v) for k, v in self.buffers.items()}


def collate_packs(rows: Sequence[Sequence[Tuple[Sequence[int], Sequence[int], np.ndarray]]], seq_length: int,
                  pad_id: int, reset: bool, num_image_token: int, context_ids: Sequence[int],
                  image_size: int, with_cu_seqlens: bool, normalize: bool = True, align: int = 1) -> dict:
    """Tensors of one micro-batch from `rows[b] = [(input_ids, labels, tiles_uint8), ...]`.

    Documents are laid out in order and padded at the end of each row. Tiles are concatenated in
    row-major (row, position) order, which is the order of their context-token blocks. With
    normalize=False the tiles stay uint8 [n, 3, H, W] (see image.normalize_pixels).
    """
    import torch

    from megatron_vita.data.image import normalize_uint8

    b = len(rows)
    if with_cu_seqlens and b != 1:
        raise ValueError(f"cu_seqlens (packing with reset) needs micro-batch size 1, got {b}")
    if seq_length % align:
        raise ValueError(f"sequence length {seq_length} is not a multiple of the packing alignment {align}")
    tokens = np.full((b, seq_length), pad_id, dtype=np.int64)
    labels = np.full((b, seq_length), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.tile(np.arange(seq_length, dtype=np.int64), (b, 1))
    aligned = align > 1 and reset
    cu, cu_padded = [0], [0]
    tiles: List[np.ndarray] = []
    num_docs = 0
    for i, docs in enumerate(rows):
        at = 0
        for ids, lab, pix in docs:
            n = len(ids)
            if at + n > seq_length:
                raise ValueError(f"documents of row {i} exceed the sequence length {seq_length}")
            tokens[i, at:at + n] = ids
            labels[i, at:at + n] = lab
            if reset:
                position_ids[i, at:at + n] = np.arange(n)
            step = -(-n // align) * align if aligned else n
            if aligned:
                position_ids[i, at + n:at + step] = np.arange(n, step)  # the document's padding continues it
            at += step
            cu.append(cu[-1] + n)
            cu_padded.append(at)
            num_docs += 1
            if len(pix):
                tiles.append(pix)
        if reset and at < seq_length:
            position_ids[i, at:] = np.arange(seq_length - at)
        if at < seq_length:
            cu.append(cu[-1] + seq_length - at)
            cu_padded.append(seq_length)
    is_ctx = np.isin(tokens, np.asarray(list(context_ids), dtype=np.int64))
    bi, si = np.nonzero(is_ctx)
    n_tiles = sum(len(t) for t in tiles)
    if len(bi) != n_tiles * num_image_token:
        raise ValueError(f"{len(bi)} feature tokens in the batch but {n_tiles} tiles x {num_image_token}")
    if not tiles:
        pixels = torch.empty((0, 3, image_size, image_size), dtype=torch.float32 if normalize else torch.uint8)
    elif normalize:
        pixels = normalize_uint8(np.concatenate(tiles))
    else:
        pixels = torch.from_numpy(np.concatenate(tiles)).permute(0, 3, 1, 2).contiguous()
    labels_t = torch.from_numpy(labels)
    out = {
        "tokens": torch.from_numpy(tokens),
        "labels": labels_t,
        "loss_mask": (labels_t != IGNORE_INDEX).to(torch.float32),
        "position_ids": torch.from_numpy(position_ids),
        "pixel_values": pixels,
        "image_indices": torch.from_numpy(np.stack([bi, si]).reshape(2, n_tiles, num_image_token)),
        "num_samples": num_docs,
    }
    if with_cu_seqlens:
        out["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
        out["max_seqlen"] = int(np.diff(cu_padded).max()) if len(cu) > 1 else seq_length
        if aligned:
            out["cu_seqlens_padded"] = torch.tensor(cu_padded, dtype=torch.int32)
    return out
