"""The generation engine's KV cache: one per language layer and rank, kept in the attention leaf.

Owns what the core-attention slot of every LLM layer does while a request is generated. The
engine wraps each layer's leaf (CoreAttention, ContextParallelAttention, a backend's fused
class) in `CachedAttention`; with no step planned it is the plain leaf (training-style forward),
with one it keeps this rank's keys / values (after RoPE, as SelfAttention hands them over) and
attends over them. What a forward does is one `Step` shared by all layers:

  local   CP 1. The step's keys are appended. One-shot prefill (or a first chunk) and decoding
          call the leaf, i.e. the backend's kernel, over the whole cache (its causal mask aligned
          bottom-right: queries are the last positions). A later prefill chunk attends over the
          cache in key tiles instead (blocks.attention_forward_), because a kernel given a
          [chunk, cache] mask (torch's SDPA on the CPU builds one) would make the chunk's memory
          grow with the prompt again.
  ring    CP > 1, first prefill chunk (the cache is empty): the leaf's ring / Ulysses attention
          over the chunk as in training; afterwards each rank keeps the keys of the tokens it
          holds (the load-balanced chunks), padding excluded.
  gather  CP > 1, a later prefill chunk (split over CP like the first): the chunk's queries are
          all-gathered (bounded by the chunk), every rank attends all of them over ITS cache
          (causal by true positions), the partial (out, lse) are all-gathered and merged with
          the online-softmax rule; each rank keeps its own queries' rows.
  decode  CP > 1, new tokens replicated on every CP rank: each rank attends them over its local
          cache, one designated rank also keeps (and attends) their keys, and the partials are
          all-gathered and merged. No rank ever holds another rank's keys.
The partial attention is `parallel.context.blocks.attention_forward_` (fp32 accumulators, tiled,
GQA without repeating K/V), the merge its `merge_`: the arithmetic of ring attention. A decoding
step's partial (no mask) runs the leaf's ring block kernel instead when the backend has one
(`--use-flash-attn` on npu: npu_fusion_attention, its softmax statistics giving the lse).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.enums import AttnMaskType

from megatron_vita.parallel.context.blocks import Segment, attention_forward_, merge_, new_accumulator

MODES = ("local", "ring", "gather", "decode")


class LayerKV:
    """One layer's keys and values on this rank: [n, b, hkv, d] each, with their true positions."""

    def __init__(self):
        self.k = self.v = self.pos = None
        self.n = 0

    def reset(self) -> None:
        self.n = 0

    def reserve(self, like: torch.Tensor, capacity: int) -> None:
        """Room for `capacity` tokens shaped like `like` [s, b, hkv, d]; what is cached is kept."""
        shape = (capacity,) + tuple(like.shape[1:])
        same = self.k is not None and self.k.shape[1:] == shape[1:] and self.k.dtype == like.dtype
        if same and self.k.shape[0] >= capacity:
            return
        old = (self.k, self.v, self.pos) if same else None
        self.k, self.v = like.new_empty(shape), like.new_empty(shape)
        self.pos = torch.empty(capacity, dtype=torch.long, device=like.device)
        if old is None:
            self.n = 0
        else:
            for new, prev in zip((self.k, self.v, self.pos), old):
                new[:self.n] = prev[:self.n]

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        s = k.shape[0]
        if self.k is None or self.n + s > self.k.shape[0]:
            self.reserve(k, max(2 * (self.n + s), 16))  # grow geometrically past the reservation
        self.k[self.n:self.n + s] = k
        self.v[self.n:self.n + s] = v
        self.pos[self.n:self.n + s] = pos
        self.n += s

    def view(self):
        return self.k[:self.n], self.v[:self.n], self.pos[:self.n]


@dataclass
class Step:
    """What the next forward does (see the module docstring). `positions` [s_local]: true positions
    of this rank's tokens; `keep` [s_local] bool: whose keys this rank stores (None: all)."""

    mode: str
    positions: torch.Tensor
    keep: Optional[torch.Tensor] = None
    group: Optional[dist.ProcessGroup] = None  # the CP group (gather / decode)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"KV-cache step mode {self.mode!r}: one of {', '.join(MODES)}")


class KVCache:
    """The caches of every LLM layer on this rank and the step they all follow."""

    def __init__(self):
        self.layers: Dict[int, LayerKV] = {}
        self.step: Optional[Step] = None
        self.reserved = 0

    def layer(self, key: int) -> LayerKV:
        return self.layers.setdefault(key, LayerKV())

    def reset(self, reserve: int = 0) -> None:
        """Empty every layer (a new request); `reserve`: tokens each layer will hold on this rank."""
        for kv in self.layers.values():
            kv.reset()
        self.reserved = reserve
        self.step = None

    def release(self) -> None:
        """Free every buffer (reset only empties them, keeping their room for the next request)."""
        self.layers.clear()
        self.step = None

    def tokens(self) -> int:
        """Tokens cached on this rank (equal in every layer)."""
        return max((kv.n for kv in self.layers.values()), default=0)


class CachedAttention(torch.nn.Module):
    """The LLM core-attention slot with the cache: `inner` is the leaf it wraps (and calls)."""

    def __init__(self, inner: torch.nn.Module, cache: KVCache, key: int):
        super().__init__()
        self.inner = inner
        self.cache = cache
        self.key = key
        self.scale = inner.softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        step = self.cache.step
        if step is None:
            return self.inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                              attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("KV-cache attention takes one unpacked sequence without attention bias")
        kv = self.cache.layer(self.key)
        if kv.k is None or kv.n == 0:
            kv.reserve(key, max(self.cache.reserved, key.shape[0]))
        if step.mode == "ring":
            out = self.inner(query, key, value, None, attn_mask_type=AttnMaskType.causal)
            self._store(kv, key, value, step)
            return out
        self._store(kv, key, value, step)
        k, v, kpos = kv.view()
        if step.mode == "local":
            s = query.shape[0]
            if s == 1 or s == k.shape[0]:
                # Decoding or a first chunk: the leaf's kernel (its causal mask aligned bottom-right).
                return self.inner(query, k, v, None, attn_mask_type=AttnMaskType.causal)
            # A later prefill chunk: key tiles, so no [chunk, cache] score or mask is ever built.
            out, _ = self._partial(query, step.positions, k, v, kpos, [Segment(0, s, 0, k.shape[0], causal=True)])
            return self._to_leaf_output(out, query.dtype)
        return self._merged(query, k, v, kpos, step)

    def _partial(self, query, qpos, k, v, kpos, segments):
        """fp32 (out [b, hq, sq, d], lse [b, hq, sq]) of queries [sq, b, hq, d] over keys [n, b, hkv, d].

        Unmasked segments (decoding under CP) go through the leaf's ring block kernel when it has
        one (a backend's fused kernel, e.g. npu_fusion_attention); causal ones (prefill chunks over
        a cache, positions not a diagonal block) through the torch key tiles."""
        q = query.permute(1, 2, 0, 3)
        out, lse = new_accumulator(q)
        kernel = attention_forward_
        if not any(seg.causal for seg in segments):
            kernel = getattr(self.inner, "block_forward", None) or attention_forward_
        if k.shape[0]:
            kernel(out, lse, q, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), segments, self.scale, qpos, kpos)
        return out, lse

    @staticmethod
    def _to_leaf_output(out: torch.Tensor, dtype) -> torch.Tensor:
        """[b, hq, s, d] fp32 -> the leaf's [s, b, hq*d] in `dtype`."""
        out = out.to(dtype).permute(2, 0, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)

    @staticmethod
    def _store(kv: LayerKV, key, value, step: Step) -> None:
        if step.keep is None:
            kv.append(key, value, step.positions)
        elif bool(step.keep.any()):
            kv.append(key[step.keep], value[step.keep], step.positions[step.keep])

    def _merged(self, query, k, v, kpos, step: Step) -> torch.Tensor:
        """Partial attention over this rank's cache, merged over the CP group (gather / decode)."""
        group = step.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        s = query.shape[0]
        if step.mode == "gather":
            queries = [torch.empty_like(query) for _ in range(size)]
            dist.all_gather(queries, query.contiguous(), group=group)
            positions = [torch.empty_like(step.positions) for _ in range(size)]
            dist.all_gather(positions, step.positions.contiguous(), group=group)
            q_all, qpos = torch.cat(queries), torch.cat(positions)
            # One segment per source rank: positions increase inside each (layout.py's order).
            segments = [Segment(j * s, (j + 1) * s, 0, k.shape[0], causal=True) for j in range(size)]
        else:
            q_all, qpos = query, step.positions
            # A decoded token follows every cached key: no mask (and no positions to compare).
            segments = [Segment(0, s, 0, k.shape[0], causal=s > 1)]
        out, lse = self._partial(q_all, qpos, k, v, kpos, segments)
        # [out | lse] in one message: a decoding step costs one all-gather per layer.
        packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)
        parts = [torch.empty_like(packed) for _ in range(size)]
        dist.all_gather(parts, packed, group=group)
        total, total_lse = new_accumulator(out)
        for part in parts:  # every rank merges in the same order: identical results
            merge_(total, total_lse, part[..., :-1], part[..., -1])
        if step.mode == "gather":
            total = total[:, :, rank * s:(rank + 1) * s]
        return self._to_leaf_output(total, query.dtype)


def install(chunks) -> KVCache:
    """Wrap the core attention of every LLM layer of this rank's chunks; returns their shared cache."""
    cache = KVCache()
    for chunk in chunks:
        for layer in language_layers(chunk):
            attn = layer.self_attention
            if not isinstance(attn.core_attention, CachedAttention):
                attn.core_attention = CachedAttention(attn.core_attention, cache, layer.layer_number)
    return cache


def language_layers(chunk) -> List[torch.nn.Module]:
    module = chunk
    while not hasattr(module, "language_model") and hasattr(module, "module"):
        module = module.module
    return list(module.language_model.decoder.layers)
