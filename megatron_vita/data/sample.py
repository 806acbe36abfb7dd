"""One record -> one training document: media planning, token layout, oversize policy, pixels.

Owns `SampleBuilder`, used twice per record with the same result: by the planner (token length
only: image headers and video probes, no pixel decoding) and by the materialiser (the same plan
plus decoded tiles). Also owns `DataStats`, the per-dataset counters and bad-sample reports.

Oversize documents (longer than the sequence) follow the recipe's `packing.oversize`:
drop (counted), truncate (cut before the first tile block that would not fit, labels after the
cut removed), or fewer_frames (videos resampled with the largest max-frames that fits, so a
4096-frame video still trains at 1M tokens; otherwise dropped).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_vita.data.image import (
    MediaError, choose_grid, image_size_from_header, load_image_pictures, num_tiles_for_grid, tiles_to_uint8,
)
from megatron_vita.data.readers import Conversation, is_within, resolve_media
from megatron_vita.data.recipe import Recipe
from megatron_vita.data.template import (
    IGNORE_INDEX, ChatEncoder, SampleError, image_token_ids, video_token_count, video_token_ids,
)
from megatron_vita.data.video import (
    check_frame_headers, list_frame_files, read_frames, sample_frame_indices, video_frame_indices,
)


@dataclass
class MediaItem:
    kind: str  # "image" | "video"
    path: str
    grid: Tuple[int, int] = (1, 1)
    num_tiles: int = 1
    indices: List[int] = field(default_factory=list)
    backend: str = ""
    total_frames: int = 0
    fps: float = 0.0


@dataclass
class Document:
    """A tokenised record: ids, pre-shifted labels, and its media in sequence order."""

    input_ids: List[int]
    labels: List[int]
    media: List[MediaItem]
    num_tiles: int  # tiles whose token blocks are in input_ids (after truncation)
    max_frames: int = 0  # the fewer_frames override used (0: the recipe's)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class SampleBuilder:
    """Builds Documents for one recipe, model geometry and tokenizer."""

    def __init__(self, recipe: Recipe, encoder: ChatEncoder, image_size: int, data_root: str):
        self.recipe = recipe
        self.encoder = encoder
        self.tokens = encoder.tokens
        self.T = encoder.num_image_token
        self.image_size = image_size
        self.data_root = os.path.abspath(data_root)
        sp = self.tokens.special
        self._open_tags = {sp["<img>"], sp["<patch>"], sp["<vid>"]}
        self._close_tags = {sp["</img>"], sp["</patch>"], sp["</vid>"]}

    # ---- planning ------------------------------------------------------------------------
    def _plan_media(self, conv: Conversation, order: Sequence[str], media_base: str, max_frames: int) -> List[MediaItem]:
        if order.count("image") != len(conv.images) or order.count("video") != len(conv.videos):
            raise SampleError(f"{order.count('image')} <image> / {order.count('video')} <video> tags but "
                              f"{len(conv.images)} images / {len(conv.videos)} videos", "placeholder_mismatch")
        roots = [self.data_root, media_base]
        real_roots = [os.path.realpath(r) for r in roots]
        images, videos = iter(conv.images), iter(conv.videos)
        im, vd = self.recipe.image, self.recipe.video
        items = []
        for kind in order:
            if kind == "image":
                path = resolve_media(next(images), media_base, roots)
                w, h = image_size_from_header(path, im.max_pixels)
                grid = choose_grid(w, h, self.image_size, im.min_tiles, im.max_tiles)
                items.append(MediaItem("image", path, grid=grid, num_tiles=num_tiles_for_grid(grid)))
            else:
                path = resolve_media(next(videos), media_base, roots)
                indices, info = video_frame_indices(path, max_frames, vd.max_fps, vd.frame_dir_fps)
                if not indices:
                    raise MediaError(f"video {path} yields no frames", "zero_frame_video")
                if info.backend == "frames":
                    self._check_frames(path, indices, real_roots)
                items.append(MediaItem("video", path, num_tiles=len(indices), indices=indices, backend=info.backend,
                                       total_frames=info.num_frames, fps=info.fps))
        return items

    def _check_frames(self, path: str, indices: Sequence[int], real_roots: Sequence[str]) -> None:
        """The sampled frames of a frame directory: inside the data root (a frame may be a
        symlink) and within image.max_pixels, from their headers (nothing decoded here)."""
        files = list_frame_files(path)
        for i in indices:
            real = os.path.realpath(files[i])
            if not any(is_within(real, r) for r in real_roots):
                raise SampleError(f"frame {i} of {path} escapes the data root (resolves to {real})", "path_escape")
        check_frame_headers(path, indices, self.recipe.image.max_pixels)

    def _media_ids(self, m: MediaItem) -> List[int]:
        if m.kind == "image":
            return image_token_ids(m.num_tiles, m.grid, self.tokens, self.T, self.encoder.newline_ids)
        return video_token_ids(len(m.indices), self.tokens, self.T)

    def build(self, conv: Conversation, media_base: str, max_frames: int = 0) -> Document:
        """The document of a record, before any oversize policy; raises SampleError/MediaError."""
        frames = max_frames or self.recipe.video.max_frames
        content_ids = self.encoder.encode_contents(conv.messages)
        media = self._plan_media(conv, self.encoder.media_tag_order(content_ids), media_base, frames)
        ids, labels = self.encoder.build(conv.messages, content_ids, [self._media_ids(m) for m in media])
        return Document(ids, labels, media, sum(m.num_tiles for m in media), max_frames=max_frames)

    def fit(self, conv: Conversation, media_base: str, max_frames: int = 0) -> Tuple[Optional[Document], str]:
        """The document as it will be packed, and what happened: ok | truncated | fewer_frames | oversize."""
        seq = self.recipe.seq_length
        doc = self.build(conv, media_base, max_frames)
        if len(doc) <= seq:
            return doc, ("fewer_frames" if max_frames else "ok")
        policy = self.recipe.packing.oversize
        if policy == "truncate":
            cut = self._truncate(doc, seq)
            return (cut, "truncated") if cut is not None else (None, "oversize")
        if policy == "fewer_frames" and any(m.kind == "video" for m in doc.media):
            f = self._fewest_frames_that_fit(doc, seq)
            if f >= 1:
                return self.build(conv, media_base, max_frames=f), "fewer_frames"
        return None, "oversize"

    def _fewest_frames_that_fit(self, doc: Document, seq: int) -> int:
        """Largest max-frames value (< the current) whose resampled videos fit; 0 if none."""
        videos = [m for m in doc.media if m.kind == "video"]
        base = len(doc) - sum(video_token_count(len(m.indices), self.T) for m in videos)
        vd = self.recipe.video

        def length(f: int) -> int:
            return base + sum(video_token_count(len(sample_frame_indices(m.total_frames, m.fps, f, vd.max_fps)), self.T)
                              for m in videos)

        lo, hi = 0, (doc.max_frames or vd.max_frames) - 1
        while lo < hi:  # the frame count is non-decreasing in max-frames: bisect
            mid = (lo + hi + 1) // 2
            if length(mid) <= seq:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _truncate(self, doc: Document, seq: int) -> Optional[Document]:
        """Cut at `seq`, moved back before any tile block the cut would split."""
        ids = doc.input_ids
        cut, kept_tiles, open_at = seq, 0, None
        for pos, tid in enumerate(ids[:seq]):
            if tid in self._open_tags:
                open_at = pos
            elif tid in self._close_tags:
                kept_tiles += 1
                open_at = None
        if open_at is not None:
            cut = open_at
        labels = doc.labels[:cut]
        if labels:
            labels[-1] = IGNORE_INDEX  # its target lies beyond the cut
        if not any(x != IGNORE_INDEX for x in labels):
            return None
        return Document(ids[:cut], labels, doc.media, kept_tiles, doc.max_frames, truncated=True)

    # ---- pixels ----------------------------------------------------------------------------
    def pixels_uint8(self, doc: Document) -> np.ndarray:
        """Decoded tiles of a document, uint8 [num_tiles, size, size, 3], in token-block order."""
        pictures = []
        left = doc.num_tiles
        im = self.recipe.image
        for m in doc.media:
            if left <= 0:
                break
            if m.kind == "image":
                tiles, grid = load_image_pictures(m.path, self.image_size, im.max_tiles, im.min_tiles, True, im.max_pixels)
                if grid != m.grid:
                    raise MediaError(f"image {m.path} changed since it was planned (grid {grid} != {m.grid})",
                                     "corrupt_image")
                pictures += tiles[:left]
            else:
                from PIL import Image

                frames = read_frames(m.path, m.indices[:left], m.backend, im.max_pixels, self.image_size)
                pictures += [Image.fromarray(f) for f in frames]
            left = doc.num_tiles - len(pictures)
        if len(pictures) != doc.num_tiles:
            raise MediaError(f"decoded {len(pictures)} tiles, planned {doc.num_tiles}", "corrupt_video")
        if not pictures:
            return np.empty((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return tiles_to_uint8(pictures, self.image_size)


class DataError(RuntimeError):
    """The data stops the run (too many bad samples, nothing usable); the message says why."""


class DataStats:
    """Per-dataset counters (seen, used, tokens, dropped, bad by reason) and the first bad reports.

    A record is `seen` and judged once by the planner (headers and probes only); a planned record
    whose media then fail to decode is added with `decode_failed`: it becomes bad under its
    reason and stops counting as used, so one DataStats holds both kinds of drop.
    """

    BAD_EXEMPT = ("oversize",)  # legitimate data that does not fit: counted, not "bad"

    def __init__(self, names: Sequence[str] = (), report_first: int = 5):
        self.counts: Dict[str, Counter] = {n: Counter() for n in names}
        self.reports: List[str] = []
        self.report_first = report_first

    def add(self, name: str, key: str, n: int = 1) -> None:
        self.counts.setdefault(name, Counter())[key] += n

    def bad(self, name: str, reason: str, location: str, message: str) -> None:
        self.add(name, f"bad:{reason}")
        if len(self.reports) < self.report_first:
            self.reports.append(f"{location}: {reason}: {message}")

    def decode_failed(self, name: str, reason: str, location: str, message: str, tokens: int) -> None:
        """A planned (counted as used) record dropped when its media were decoded."""
        self.bad(name, reason, location, message)
        self.add(name, "decode_failed")
        self.add(name, "decode_failed_tokens", tokens)

    def used(self) -> int:
        """Records trained on: planned ones minus those dropped when decoded."""
        return self.total("used") - self.total("decode_failed")

    def total(self, key: str) -> int:
        return sum(c[key] for c in self.counts.values())

    def bad_total(self) -> int:
        return sum(v for c in self.counts.values() for k, v in c.items() if k.startswith("bad:"))

    def bad_by_reason(self) -> Dict[str, int]:
        out: Counter = Counter()
        for c in self.counts.values():
            out.update({k[4:]: v for k, v in c.items() if k.startswith("bad:")})
        return dict(sorted(out.items()))

    def state_dict(self) -> dict:
        return {"counts": {n: dict(c) for n, c in self.counts.items()}, "reports": list(self.reports)}

    def load_state_dict(self, d: dict) -> None:
        self.counts = {n: Counter(c) for n, c in d["counts"].items()}
        self.reports = list(d["reports"])

    def copy(self) -> "DataStats":
        out = DataStats(report_first=self.report_first)
        out.load_state_dict(self.state_dict())
        return out

    def merge(self, other: dict) -> None:
        for n, c in other["counts"].items():
            self.counts.setdefault(n, Counter()).update(c)
        for r in other["reports"]:
            if len(self.reports) < self.report_first:
                self.reports.append(r)

    def summary(self) -> str:
        seen, bad = self.total("seen"), self.bad_total()
        late = self.total("decode_failed")
        lines = [f"samples seen {seen}, used {self.used()}, bad {bad} ({bad / max(seen, 1):.2%}"
                 f"{f', {late} found when decoding' if late else ''}), "
                 f"dropped oversize {self.total('oversize')}, truncated {self.total('truncated')}, "
                 f"fewer frames {self.total('fewer_frames')}"]
        if bad:
            lines.append("bad by reason: " + ", ".join(f"{k} {v}" for k, v in self.bad_by_reason().items()))
            lines += ["  " + r for r in self.reports]
        return "\n".join(lines)

    def check_fraction(self, max_fraction: float, min_samples: int) -> None:
        """Stop the run (DataError with the summary) when too many samples are bad."""
        seen, bad = self.total("seen"), self.bad_total()
        if seen >= max(min_samples, 1) and bad / seen > max_fraction:
            raise DataError(f"bad-sample fraction {bad / seen:.2%} exceeds bad_samples.max_fraction "
                            f"{max_fraction:.2%} after {seen} samples:\n{self.summary()}")
