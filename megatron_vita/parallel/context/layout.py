"""The load-balanced context-parallel split of a sequence, or of a packed sequence of documents.

Owns which tokens each CP rank holds and every conversion between the global order and the
per-rank order: padding each document to a multiple of 2*CP, the split itself, its inverse
gather, the per-rank cu_seqlens and the true positions of each rank's tokens.

Causal attention makes late tokens cost more than early ones, so a contiguous split would give
the last rank most of the work. Each document is instead cut into 2*CP equal chunks and rank r
keeps chunks r and 2*CP-1-r (one early, one late), in that order, documents one after another:

    rank r local = [doc0 chunk r | doc0 chunk 2CP-1-r | doc1 chunk r | doc1 chunk 2CP-1-r | ...]

An unpacked sequence is one document. Every document being split on its own is what keeps
attention from crossing document boundaries under CP; the padding goes at each document's end,
where causal attention never lets a real token see it. The same layout serves ring, Ulysses and
hybrid attention (and megatron-core's RoPE slicing under CP, which assumes it for an unpacked
sequence): a Ulysses group of U consecutive CP ranks together holds exactly the chunks that ring
rank g of a 2*(CP/U)-chunk split holds, so hybrid needs only a permutation between the two.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class SeqLayout:
    """One (packed) sequence split over `degree` ranks. `lengths` are the real document lengths;
    `padded` the same rounded up to a multiple of 2*degree (or of a coarser `multiple`)."""

    lengths: Tuple[int, ...]
    padded: Tuple[int, ...]
    degree: int

    def __post_init__(self):
        if self.degree < 1:
            raise ValueError(f"context-parallel degree must be >= 1 (got {self.degree})")
        if not self.lengths or len(self.lengths) != len(self.padded):
            raise ValueError("a layout needs one padded length per document and at least one document")
        for n, p in zip(self.lengths, self.padded):
            if n < 1 or p < n or p % (2 * self.degree):
                raise ValueError(f"document of {n} tokens padded to {p}: the padded length must be >= the real "
                                 f"length and a multiple of 2*CP = {2 * self.degree}")

    @classmethod
    def packed(cls, lengths: Sequence[int], degree: int, multiple: Optional[int] = None) -> "SeqLayout":
        """Documents of `lengths` tokens, each padded to a multiple of `multiple` (default 2*degree).

        With sequence parallelism the local sequence must also split over TP: pass
        multiple = degree * lcm(2, TP) (see validate.sequence_multiple)."""
        multiple = multiple or 2 * degree
        if multiple % (2 * degree):
            raise ValueError(f"padding multiple {multiple} is not a multiple of 2*CP = {2 * degree}")
        lengths = tuple(int(n) for n in lengths)
        return cls(lengths, tuple(-(-n // multiple) * multiple for n in lengths), degree)

    @classmethod
    def single(cls, seq_length: int, degree: int) -> "SeqLayout":
        """One unpacked sequence; it must already be a multiple of 2*degree (nothing is padded)."""
        if seq_length % (2 * degree):
            raise ValueError(f"sequence length {seq_length} is not a multiple of 2*CP = {2 * degree}")
        return cls((seq_length,), (seq_length,), degree)

    def with_degree(self, degree: int) -> "SeqLayout":
        """The same padded documents split over another number of ranks (hybrid: the ring level)."""
        return SeqLayout(self.lengths, self.padded, degree)

    @property
    def total(self) -> int:
        """Tokens of the padded global sequence."""
        return sum(self.padded)

    @property
    def local_length(self) -> int:
        return self.total // self.degree

    @property
    def has_padding(self) -> bool:
        return self.lengths != self.padded

    @property
    def chunk_sizes(self) -> Tuple[int, ...]:
        """Tokens of one of the 2*degree chunks, per document."""
        return tuple(p // (2 * self.degree) for p in self.padded)

    def cu_seqlens(self, padded: bool = True) -> List[int]:
        """Global cumulative document boundaries with the leading 0 (megatron's cu_seqlens)."""
        return _cumulative(self.padded if padded else self.lengths)

    def local_cu_seqlens(self) -> List[int]:
        """Per-rank boundaries of each document's local part (equal on every rank): padded / degree."""
        return _cumulative(p // self.degree for p in self.padded)

    def indices(self, rank: int) -> torch.Tensor:
        """Positions in the padded global sequence of rank `rank`'s tokens, in its local order."""
        return _indices(self.padded, self.degree, self._check_rank(rank))

    def positions(self, rank: int) -> torch.Tensor:
        """Position inside its own document of each of rank `rank`'s tokens."""
        return _positions(self.padded, self.degree, self._check_rank(rank))

    def position_ids(self, rank: int, reset: bool = True) -> torch.Tensor:
        """RoPE position ids of the rank's tokens: within the document (packing with reset), or the
        index in the padded global sequence (one causal sequence)."""
        return self.positions(rank) if reset else self.indices(rank)

    def _check_rank(self, rank: int) -> int:
        if not 0 <= rank < self.degree:
            raise ValueError(f"rank {rank} outside a context-parallel group of {self.degree}")
        return rank


def _cumulative(sizes) -> List[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + int(n))
    return out


@functools.lru_cache(maxsize=256)
def _indices(padded: Tuple[int, ...], degree: int, rank: int) -> torch.Tensor:
    parts, start = [], 0
    for p in padded:
        c = p // (2 * degree)
        for chunk in (rank, 2 * degree - 1 - rank):
            parts.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
        start += p
    return torch.cat(parts)


@functools.lru_cache(maxsize=256)
def _positions(padded: Tuple[int, ...], degree: int, rank: int) -> torch.Tensor:
    parts = []
    for p in padded:
        c = p // (2 * degree)
        parts += [torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * degree - 1 - rank) * c, (2 * degree - rank) * c)]
    return torch.cat(parts)


def pad_documents(x: torch.Tensor, layout: SeqLayout, dim: int = 0, value=0) -> torch.Tensor:
    """Packed real documents (sum(lengths) along `dim`) -> the padded global sequence, `value` in the gaps."""
    if x.shape[dim] != sum(layout.lengths):
        raise ValueError(f"{x.shape[dim]} tokens along dim {dim}, but the documents hold {sum(layout.lengths)}")
    if not layout.has_padding:
        return x
    shape = list(x.shape)
    shape[dim] = layout.total
    out = x.new_full(shape, value)
    out.index_copy_(dim, _real_positions(layout).to(x.device), x)
    return out


def unpad_documents(x: torch.Tensor, layout: SeqLayout, dim: int = 0) -> torch.Tensor:
    """Inverse of pad_documents: drop every padding token."""
    if not layout.has_padding:
        return x
    return x.index_select(dim, _real_positions(layout).to(x.device))


def _real_positions(layout: SeqLayout) -> torch.Tensor:
    starts = layout.cu_seqlens()
    return torch.cat([torch.arange(s, s + n) for s, n in zip(starts, layout.lengths)])


def split_for_rank(x: torch.Tensor, layout: SeqLayout, rank: int, dim: int = 0) -> torch.Tensor:
    """Rank `rank`'s share of the padded global sequence along `dim`, in its local order."""
    if x.shape[dim] != layout.total:
        raise ValueError(f"{x.shape[dim]} tokens along dim {dim}, but the padded sequence has {layout.total}")
    return x.index_select(dim, layout.indices(rank).to(x.device))


def gather_from_ranks(parts: Sequence[torch.Tensor], layout: SeqLayout, dim: int = 0) -> torch.Tensor:
    """Inverse of split_for_rank: the ranks' local tensors (by rank) -> the padded global sequence."""
    if len(parts) != layout.degree:
        raise ValueError(f"{len(parts)} parts for a context-parallel group of {layout.degree}")
    order = torch.cat([layout.indices(r) for r in range(layout.degree)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return torch.cat(list(parts), dim=dim).index_select(dim, inverse.to(parts[0].device))
