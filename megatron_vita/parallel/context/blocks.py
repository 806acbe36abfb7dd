"""Block attention: softmax attention of a query block against a key block, tile by tile, in torch.

Owns the arithmetic every context-parallel algorithm is built from, on any backend:
 - `attention_forward_`: accumulates the attention of query rows against one key block into a
   running (out, lse) pair with the online-softmax rule, so partial results over key blocks that
   arrive one at a time (ring steps) merge into exactly the softmax over all of them;
 - `attention_backward_`: the gradients of one (query block, key block) pair recomputed from
   the saved inputs and the FINAL out / lse (flash-attention's backward), added in place;
 - `merge_`: the online-softmax merge of two partial results.

What attends to what is given as `Segment`s: query rows [q0, q1) against key rows [k0, k1) of the
same document, optionally causal. Causality compares true positions (`q_pos`, `k_pos`: position of
each row inside its document), so the three block rules of load-balanced ring attention are
segments a caller builds (ring.py): the diagonal block is causal, the others need no mask at all.
Positions must increase along each segment's rows (true of every layout in layout.py), which lets
a query tile skip the key tiles wholly after it.

Memory: no [s, s] scores. Queries and keys are processed in tiles of at most `tile` rows, so the
largest temporary is [b, heads, tile, tile]; the exponentials and dS are computed in place, so at
most one (forward) or two (backward) of them are alive at a time (at narrow widths this fixed
workspace, not the activations, would otherwise set a rank's peak). GQA is computed without
repeating K/V: the query heads sharing a KV head are folded into the query rows of one matmul.
Scores, softmax and all accumulators are fp32 whatever the input dtype (the precision flash
attention keeps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

DEFAULT_TILE = 1024


@dataclass(frozen=True)
class Segment:
    """Query rows [q0, q1) attend key rows [k0, k1); `causal` masks keys positioned after the query."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool = False


def new_accumulator(q: torch.Tensor):
    """(out, lse) for no keys yet: out 0, lse -inf; fp32, out shaped like q, lse without the head dim."""
    return (torch.zeros(q.shape, dtype=torch.float32, device=q.device),
            torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device))


def merge_(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """(out, lse) <- the softmax over both key sets, from two partial (normalised out, lse) results.

    Rows that saw no key in one of them (lse -inf) take the other unchanged; rows with no key in
    either stay (0, -inf)."""
    new = torch.logaddexp(lse, blk_lse)
    safe = new.masked_fill(new == float("-inf"), 0.0)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(blk_out * torch.exp(blk_lse - safe).unsqueeze(-1))
    lse.copy_(new)


def _groups(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    return q.shape[1] // k.shape[1]


def _fold(x: torch.Tensor, hkv: int, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of [B, hq, s, ...] as [B, hkv, g*(b-a), ...] fp32 (query heads of one KV head stacked)."""
    B, hq = x.shape[:2]
    t = x.reshape(B, hkv, hq // hkv, *x.shape[2:])[:, :, :, a:b]
    return t.reshape(B, hkv, -1, *x.shape[3:]).float()


class _Causal:
    """Positions for the causal masks: on the host to bound tiles, on the device to build masks."""

    def __init__(self, q: torch.Tensor, segments, q_pos, k_pos, groups: int):
        self.active = any(seg.causal for seg in segments)
        self.groups = groups
        if self.active:
            if q_pos is None or k_pos is None:
                raise ValueError("causal segments need q_pos and k_pos")
            self.q_pos, self.k_pos = q_pos.cpu(), k_pos.cpu()
            self.q_pos_d, self.k_pos_d = self.q_pos.to(q.device), self.k_pos.to(q.device)

    def key_end(self, seg: Segment, last_row: int) -> int:
        """Keys after the tile's last query are masked for every row of the tile: stop there."""
        if not seg.causal:
            return seg.k1
        return seg.k0 + int(torch.searchsorted(self.k_pos[seg.k0:seg.k1], int(self.q_pos[last_row]), right=True))

    def scores(self, qt, kt, scale: float, seg: Segment, a: int, b: int, c: int, e: int) -> torch.Tensor:
        """Scaled scores of query rows [a, b) (folded) against key rows [c, e), causal mask applied."""
        s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
        if seg.causal and self.k_pos[e - 1] > self.q_pos[a]:  # some key of the tile follows some query
            mask = self.k_pos_d[c:e].unsqueeze(0) > self.q_pos_d[a:b].unsqueeze(1)  # True = masked
            s.view(*s.shape[:2], self.groups, b - a, e - c).masked_fill_(mask, float("-inf"))
        return s


def attention_forward_(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       segments: Iterable[Segment], scale: float, q_pos: Optional[torch.Tensor] = None,
                       k_pos: Optional[torch.Tensor] = None, tile: int = DEFAULT_TILE) -> None:
    """Merge softmax(q k^T * scale) v over each segment's keys into (out, lse), in place.

    q [B, hq, sq, d]; k, v [B, hkv, sk, d]; out fp32 [B, hq, sq, d]; lse fp32 [B, hq, sq]."""
    segments = list(segments)
    g, hkv, B = _groups(q, k), k.shape[1], q.shape[0]
    causal = _Causal(q, segments, q_pos, k_pos, g)
    out5 = out.view(B, hkv, g, *out.shape[2:])
    lse4 = lse.view(B, hkv, g, lse.shape[-1])
    for seg, a, b, k_end in _query_tiles(segments, causal, tile):
        qt = _fold(q, hkv, a, b)
        m = torch.full(qt.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qt)
        for c in range(seg.k0, k_end, tile):
            e = min(c + tile, k_end)
            s = causal.scores(qt, k[:, :, c:e].float(), scale, seg, a, b, c, e)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
            p = s.sub_(m_safe.unsqueeze(-1)).exp_()  # in place: one [tile, tile] buffer per key tile
            corr = torch.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            acc = acc * corr.unsqueeze(-1) + torch.matmul(p, v[:, :, c:e].float())
            m = m_new
            del s, p  # before the next tile's scores are allocated
        seen = l > 0
        blk_out = (acc / torch.where(seen, l, 1.0).unsqueeze(-1)).view(B, hkv, g, b - a, -1)
        blk_lse = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), float("-inf")).view(B, hkv, g, b - a)
        merge_(out5[:, :, :, a:b], lse4[:, :, :, a:b], blk_out, blk_lse)


def _query_tiles(segments, causal: "_Causal", tile: int):
    """(segment, first query, end query, end key) of every query tile that sees at least one key."""
    for seg in segments:
        for a in range(seg.q0, seg.q1, tile):
            b = min(a + tile, seg.q1)
            k_end = causal.key_end(seg, b - 1)
            if k_end > seg.k0:
                yield seg, a, b, k_end


def attention_backward_(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                        segments: Iterable[Segment], scale: float, q_pos: Optional[torch.Tensor] = None,
                        k_pos: Optional[torch.Tensor] = None, tile: int = DEFAULT_TILE) -> None:
    """Add this key block's share of dQ (to dq) and its dK, dV (to dk, dv), all fp32, in place.

    `lse` is the final log-sum-exp of each query row over ALL keys and `delta` = rowsum(dout * out)
    with the final out, so P = exp(S - lse) is the true attention probability of each pair and
    the block's gradients are exact pieces of the whole (dS = P * (dP - delta))."""
    segments = list(segments)
    g, hkv, B = _groups(q, k), k.shape[1], q.shape[0]
    causal = _Causal(q, segments, q_pos, k_pos, g)
    dq5 = dq.view(B, hkv, g, *dq.shape[2:])
    # A row without any key has lse -inf; +inf makes its probabilities 0 instead of nan.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    for seg, a, b, k_end in _query_tiles(segments, causal, tile):
        qt, dot = _fold(q, hkv, a, b), _fold(dout, hkv, a, b)
        lse_t, delta_t = _fold(lse, hkv, a, b).unsqueeze(-1), _fold(delta, hkv, a, b).unsqueeze(-1)
        dq_t = torch.zeros_like(qt)
        for c in range(seg.k0, k_end, tile):
            e = min(c + tile, k_end)
            kt, vt = k[:, :, c:e].float(), v[:, :, c:e].float()
            # In place, so at most two [tile, tile] buffers (P, then dS) are alive at once.
            p = causal.scores(qt, kt, scale, seg, a, b, c, e).sub_(lse_t).exp_()
            dv[:, :, c:e] += torch.matmul(p.transpose(-1, -2), dot)
            ds = torch.matmul(dot, vt.transpose(-1, -2)).sub_(delta_t).mul_(p)
            del p
            dq_t += torch.matmul(ds, kt)
            dk[:, :, c:e] += torch.matmul(ds.transpose(-1, -2), qt).mul_(scale)
            del ds
        dq5[:, :, :, a:b] += dq_t.mul_(scale).view(B, hkv, g, b - a, -1)

