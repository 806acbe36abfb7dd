"""Visual tokens: how ViT patches become LLM tokens and where they go in a sequence.

Both model sides follow one convention, so it lives here once: the Megatron model
(models/long_vita, models/projector) and the transformers classes (hf/modeling) import it.
Plain torch only, so the HF classes use it without importing megatron-core and the Megatron
model uses it without importing the HF modeling module.

- `pixel_shuffle`: InternVL's space-to-depth on a tile's patch grid (Long-VITA: ratio 0.5, so
  a 32x32 grid of C-wide patches becomes 16x16 tokens 4C wide).
- `context_token_indices`: the positions of the visual context tokens (<IMG_CONTEXT>,
  <VID_CONTEXT>, <PATCH_CONTEXT>) in `input_ids`, grouped per tile; used when the caller gives
  no `image_indices`.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL's pixel shuffle on [n, w, h, c] -> [n, w*r, h*r, c/r^2] (op order matters: it decides
    which patch lands in which channel block, and so which released projector weights apply)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3).contiguous()


def context_token_indices(input_ids: torch.Tensor, context_ids: Iterable[int], num_image_token: int,
                          n_tiles: Optional[int] = None) -> torch.LongTensor:
    """Where each tile's feature tokens go: LongTensor [2, n_tiles, num_image_token].

    Row 0 holds batch indices, row 1 sequence positions. Every position of `input_ids`
    ([batch, seq]) whose id is one of `context_ids` is taken in row-major (batch, position)
    order and grouped `num_image_token` per tile, so tile k of `images` fills the k-th group.
    Raises ValueError when the count is not a whole number of tiles, or not `n_tiles` tiles.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    ids = torch.as_tensor(list(context_ids), dtype=input_ids.dtype, device=input_ids.device)
    batch, pos = torch.isin(input_ids, ids).nonzero(as_tuple=True)  # row-major order
    count = batch.numel()
    expected = None if n_tiles is None else n_tiles * num_image_token
    if count % num_image_token or (expected is not None and count != expected):
        want = (f"{n_tiles} tiles x {num_image_token} = {expected}" if expected is not None
                else f"a multiple of {num_image_token} (tokens per tile)")
        raise ValueError(f"input_ids hold {count} visual context tokens (ids {sorted(ids.tolist())}), "
                         f"expected {want}")
    return torch.stack([batch, pos]).reshape(2, count // num_image_token, num_image_token)
