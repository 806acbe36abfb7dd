"""What a mapping rule's `transform` and `shard` names mean: one class each, in two tables.

A transform says how the full (TP=1) megatron-core tensor of a rule is made from its HF
tensor(s) and back, and how its rows run over the HF tensors (so readers and writers can move
rows in place). A shard kind says how a full megatron-core tensor splits over tensor-parallel
ranks: the piece of a rank, the full tensor from the pieces, and the regions megatron-core's
dist checkpoints store. `TRANSFORMS` and `SHARD_KINDS` are the only places that know the names:
a new transform or shard kind is one class added to its table, and every reader, writer and
model loader uses it through these methods.

`heads` below is (query heads, KV groups, head dim) of the attention a rule belongs to.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

Heads = Tuple[int, int, int]
Shape = Tuple[int, ...]
Region = Tuple[Shape, Shape]  # (offsets, sizes)
# A full tensor's rows as runs of HF rows: (HF name, first HF row, row count; -1 = all rows).
Segments = List[Tuple[str, int, int]]


# ---- transforms between the HF and the full (TP=1) megatron tensors ---------------------------

class Transform:
    """identity: the HF tensor is the megatron tensor."""

    def to_mcore(self, hf: Sequence[torch.Tensor], heads: Heads) -> torch.Tensor:
        return hf[0]

    def to_hf(self, names: Sequence[str], full: torch.Tensor, heads: Heads) -> Dict[str, torch.Tensor]:
        return {names[0]: full}

    def row_segments(self, names: Sequence[str], heads: Heads) -> Optional[Segments]:
        """None when the transform is not a rearrangement of whole rows."""
        return [(names[0], 0, -1)]


class PositionEmbedding(Transform):
    """pos: HF position_embedding [1, N, C] <-> megatron [N, C]."""

    def to_mcore(self, hf, heads):
        return hf[0].reshape(hf[0].shape[-2], hf[0].shape[-1])

    def to_hf(self, names, full, heads):
        return {names[0]: full.unsqueeze(0)}

    def row_segments(self, names, heads):
        return None


class GatedMLP(Transform):
    """glu: HF gate/up <-> fc1 = [gate; up]."""

    def to_mcore(self, hf, heads):
        return torch.cat([hf[0], hf[1]], dim=0)

    def to_hf(self, names, full, heads):
        gate, up = full.chunk(2, dim=0)
        return {names[0]: gate, names[1]: up}

    def row_segments(self, names, heads):
        return [(names[0], 0, -1), (names[1], 0, -1)]


def _group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, d: int) -> torch.Tensor:
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _ungroup_qkv(x: torch.Tensor, heads: int, groups: int, d: int):
    rest = x.shape[1:]
    x = x.reshape(groups, (heads // groups + 2) * d, *rest)
    q, k, v = x.split([heads // groups * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


class GroupedQKV(Transform):
    """qkv: HF q/k/v <-> megatron's fused QKV grouped per KV group: [q heads of group g; k_g; v_g]."""

    def _parts(self, names: Sequence[str], heads: Heads) -> List[Tuple[str, int]]:
        """(HF name, first row) of the Q, K and V blocks."""
        return [(names[0], 0), (names[1], 0), (names[2], 0)]

    def _split(self, hf: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        return hf

    def _join(self, names: Sequence[str], q, k, v) -> Dict[str, torch.Tensor]:
        return dict(zip(names, (q, k, v)))

    def to_mcore(self, hf, heads):
        return _group_qkv(*self._split(hf), *heads)

    def to_hf(self, names, full, heads):
        return self._join(names, *_ungroup_qkv(full, *heads))

    def row_segments(self, names, heads):
        n_heads, groups, d = heads
        per = n_heads // groups * d
        (q, q0), (k, k0), (v, v0) = self._parts(names, heads)
        return [seg for g in range(groups) for seg in ((q, q0 + g * per, per), (k, k0 + g * d, d), (v, v0 + g * d, d))]


class FusedQKV(GroupedQKV):
    """vit_qkv: the ViT's fused HF qkv [all Q; all K; all V] <-> the grouped layout (per-head
    interleave [q_h, k_h, v_h] for the ViT's MHA)."""

    def _parts(self, names, heads):
        n_heads, _, d = heads
        return [(names[0], 0), (names[0], n_heads * d), (names[0], 2 * n_heads * d)]

    def _split(self, hf):
        return hf[0].chunk(3, dim=0)

    def _join(self, names, q, k, v):
        return {names[0]: torch.cat([q, k, v], dim=0)}


TRANSFORMS: Dict[str, Transform] = {
    "identity": Transform(),
    "pos": PositionEmbedding(),
    "glu": GatedMLP(),
    "qkv": GroupedQKV(),
    "vit_qkv": FusedQKV(),
}


# ---- tensor-parallel sharding of full megatron tensors -----------------------------------------

def pad_vocab(full: torch.Tensor, padded_rows: int) -> torch.Tensor:
    if full.shape[0] > padded_rows:
        raise ValueError(f"vocabulary of {full.shape[0]} rows does not fit the padded size {padded_rows}")
    if full.shape[0] == padded_rows:
        return full
    return torch.cat([full, full.new_zeros(padded_rows - full.shape[0], *full.shape[1:])], dim=0)


def narrow(t: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    for d, (o, s) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, s)
    return t


class ShardKind:
    """replicated: every TP rank holds the whole tensor.

    `full` is the model's tensor (vocabulary unpadded); `padded_vocab` / `vocab_size` matter
    only to kinds with `pads_vocab` (the stored tensor has the layout's padded vocabulary rows).
    """

    pads_vocab = False

    def piece_shape(self, full: Sequence[int], tp: int, padded_vocab: int) -> Shape:
        """Shape of one TP rank's piece of a full tensor of shape `full`."""
        return tuple(full)

    def full_shape(self, piece: Sequence[int], tp: int, vocab_size: int) -> Shape:
        """Shape of the full tensor assembled from `tp` pieces of shape `piece`."""
        return tuple(piece)

    def pieces_to_read(self, tp: int) -> int:
        """How many TP ranks' pieces make the full tensor."""
        return 1

    def shard(self, full: torch.Tensor, tp: int, rank: int, padded_vocab: Optional[int] = None) -> torch.Tensor:
        """This TP rank's piece of a full tensor."""
        return full

    def unshard(self, pieces: Sequence[torch.Tensor], vocab_size: Optional[int] = None) -> torch.Tensor:
        """The full tensor from all TP ranks' pieces (padded vocabulary rows dropped)."""
        return pieces[0]

    def place(self, full: torch.Tensor, piece: torch.Tensor, tp: int, rank: int) -> None:
        """Copy TP rank `rank`'s piece into the full tensor (padded vocabulary rows dropped)."""
        full.copy_(piece)

    def stored_shape(self, full: Sequence[int], padded_vocab: int) -> Shape:
        """Global shape of the tensor as a layout with `padded_vocab` rows stores it."""
        return tuple(full)

    def fits(self, stored: Sequence[int], full: Sequence[int]) -> bool:
        """Whether a stored global shape holds a full tensor of shape `full`."""
        return list(stored) == list(full)

    def model_shape(self, stored: Sequence[int], vocab_size: int) -> Shape:
        """The model's (unpadded) shape of a stored global shape."""
        return tuple(stored)

    def regions(self, stored: Sequence[int], tp: int) -> List[Region]:
        """The (offsets, sizes) chunks megatron-core saves of a stored tensor at TP `tp`."""
        return [((0,) * len(stored), tuple(stored))]

    def cut(self, full: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The region (offsets, sizes) of the stored tensor, taken from the model's full tensor."""
        return narrow(full, offsets, sizes)


class Split(ShardKind):
    """column (dim 0) / row (dim 1): contiguous chunks of one dimension."""

    def __init__(self, dim: int):
        self.dim = dim

    def piece_shape(self, full, tp, padded_vocab):
        shape = list(full)
        shape[self.dim] //= tp
        return tuple(shape)

    def full_shape(self, piece, tp, vocab_size):
        shape = list(piece)
        shape[self.dim] *= tp
        return tuple(shape)

    def pieces_to_read(self, tp):
        return tp

    def shard(self, full, tp, rank, padded_vocab=None):
        return full if tp == 1 else full.chunk(tp, dim=self.dim)[rank]

    def unshard(self, pieces, vocab_size=None):
        return torch.cat(list(pieces), dim=self.dim)

    def place(self, full, piece, tp, rank):
        step = piece.shape[self.dim]
        full.narrow(self.dim, rank * step, step).copy_(piece)

    def regions(self, stored, tp):
        stored = tuple(stored)
        if tp == 1:
            return super().regions(stored, tp)
        d, step = self.dim, stored[self.dim] // tp
        return [(tuple(r * step if i == d else 0 for i in range(len(stored))),
                 tuple(step if i == d else s for i, s in enumerate(stored))) for r in range(tp)]


class Vocab(Split):
    """vocab: dim 0 after padding the vocabulary to the layout's padded size (padding rows are zeros)."""

    pads_vocab = True

    def __init__(self):
        super().__init__(0)

    def piece_shape(self, full, tp, padded_vocab):
        return (padded_vocab // tp,) + tuple(full[1:])

    def full_shape(self, piece, tp, vocab_size):
        return (vocab_size,) + tuple(piece[1:])

    def shard(self, full, tp, rank, padded_vocab=None):
        # Pad only the piece that reaches past the vocabulary: the full padded table is never built.
        rows = padded_vocab if padded_vocab is not None else full.shape[0]
        if full.shape[0] > rows or rows % tp:
            raise ValueError(f"vocabulary of {full.shape[0]} rows does not fit the padded size {rows} at TP {tp}")
        per = rows // tp
        piece = full[rank * per:min((rank + 1) * per, full.shape[0])]
        return piece if piece.shape[0] == per else pad_vocab(piece, per)

    def unshard(self, pieces, vocab_size=None):
        full = super().unshard(pieces)
        return full[:vocab_size] if vocab_size is not None else full

    def place(self, full, piece, tp, rank):
        start = rank * piece.shape[0]
        rows = max(0, min(piece.shape[0], full.shape[0] - start))
        full[start:start + rows].copy_(piece[:rows])

    def stored_shape(self, full, padded_vocab):
        return (padded_vocab,) + tuple(full[1:])

    def fits(self, stored, full):
        # Padded vocabulary rows are dropped on read.
        return len(stored) == len(full) and list(stored[1:]) == list(full[1:]) and stored[0] >= full[0]

    def model_shape(self, stored, vocab_size):
        return (vocab_size,) + tuple(stored[1:])

    def cut(self, full, offsets, sizes):
        # Rows past the vocabulary are padding: zeros, made only for the piece that needs them.
        start, rows = offsets[0], sizes[0]
        return pad_vocab(full[start:min(start + rows, full.shape[0])], rows)


class GluHalves(Split):
    """glu: gate and up halves of fc1 split separately; rank r gets [gate_r; up_r]."""

    def __init__(self):
        super().__init__(0)

    def shard(self, full, tp, rank, padded_vocab=None):
        if tp == 1:
            return full
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)

    def unshard(self, pieces, vocab_size=None):
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)

    def place(self, full, piece, tp, rank):
        half, step = full.shape[0] // 2, piece.shape[0] // 2
        full[rank * step:(rank + 1) * step].copy_(piece[:step])
        full[half + rank * step:half + (rank + 1) * step].copy_(piece[step:])

    def regions(self, stored, tp):
        # megatron's swiglu factory saves each half's pieces, at TP 1 too.
        stored = tuple(stored)
        half = stored[0] // 2
        step = half // tp
        zeros = (0,) * (len(stored) - 1)
        return [((h * half + r * step,) + zeros, (step,) + stored[1:]) for h in (0, 1) for r in range(tp)]


SHARD_KINDS: Dict[str, ShardKind] = {
    "replicated": ShardKind(),
    "column": Split(0),
    "row": Split(1),
    "vocab": Vocab(),
    "glu": GluHalves(),
}
