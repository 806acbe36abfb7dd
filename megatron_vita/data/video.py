"""Video frames for Long-VITA: probing, the frame sampling rule, decoding (decord, PyAV fallback).

Owns the pixel side of a `<video>`. A video is a file (decoded with decord, the reference
decoder; PyAV when decord is missing or cannot open the file) or a directory of frame images
(natural sort order, treated as a video at `frame_dir_fps`), whose frames obey the image pixel
limit and are decoded no larger than their tile needs. Files ffmpeg cannot open are refused
before decord sees them, so a bad video costs one counted report, not a page of ffmpeg logs.

Sampling rule (longvita.md): step = max(avg_fps / max_fps, n_frames / (max_num_frames + 1));
indices int(i * step) for i in [0, max_num_frames), kept if < n_frames. So at most max_fps
frames per second, at most max_num_frames frames, always starting at frame 0. Every sampled
frame becomes exactly one tile (pad to square with the mean colour, bicubic resize, ImageNet
normalisation, as image.py does for tiles).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from megatron_vita.data.image import (
    DEFAULT_MAX_IMAGE_PIXELS, MediaError, image_size_from_header, normalize_uint8, tiles_to_uint8,
)

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class VideoInfo:
    """What the sampling rule needs to know about a video."""

    num_frames: int
    fps: float
    backend: str  # "decord" | "pyav" | "frames"


def sample_frame_indices(num_frames: int, avg_fps: float, max_num_frames: int, max_fps: float = 1.0) -> List[int]:
    """Indices of the frames a video contributes (the documented rule, from frame 0)."""
    if max_num_frames < 1:
        raise ValueError(f"max_num_frames must be >= 1, got {max_num_frames}")
    if max_fps <= 0:
        raise ValueError(f"max_fps must be > 0, got {max_fps}")
    if num_frames <= 0:
        return []
    # An unknown or broken frame rate is taken as 1 fps rather than dividing by it.
    fps = avg_fps if avg_fps and math.isfinite(avg_fps) and avg_fps > 0 else 1.0
    step = max(fps / max_fps, num_frames / (max_num_frames + 1))
    return [k for k in (int(i * step) for i in range(max_num_frames)) if k < num_frames]


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def list_frame_files(directory: str) -> List[str]:
    """Frame images of a frame directory, in natural order (frame2 before frame10)."""
    names = [n for n in os.listdir(directory) if n.lower().endswith(FRAME_EXTENSIONS)]
    return [os.path.join(directory, n) for n in sorted(names, key=_natural_key)]


_DECORD = []


def _decord():
    if not _DECORD:
        try:
            import decord

            # decord's bundled ffmpeg logs every problem of a bad file to stderr (a dozen lines per
            # video); the loader reports each bad video once, counted, so ffmpeg stays quiet.
            decord.logging.set_level(decord.logging.QUIET)
        except ImportError:
            decord = None
        _DECORD.append(decord)
    return _DECORD[0]


def _ffmpeg_opens(path: str) -> Optional[str]:
    """None if PyAV (quiet by default) opens the file and finds a video stream, else why not.

    Run before decord: decord prints an unsilenceable `ERROR opening: ...` line to stderr for
    every file ffmpeg cannot open, while PyAV logs nothing unless asked.
    """
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream"
    except Exception as e:
        return str(e)
    return None


def _open_decord(path: str):
    # Readers are never cached: a reader inherited by a forked DataLoader worker aborts the
    # process when it is destroyed there (decord joins threads the child does not have).
    decord = _decord()
    if decord is None:
        return None
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception:  # decord raises its own DECORDError / RuntimeError subclasses
        return None


def _pyav_info(path: str) -> VideoInfo:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"video {path} has no video stream", "zero_frame_video")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            n = int(stream.frames or 0)
            if n <= 0:
                # Containers without a frame count: count the packets that carry a frame.
                n = sum(1 for p in container.demux(stream) if p.size > 0)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot read video {path}: {e}", "corrupt_video") from None
    return VideoInfo(n, fps, "pyav")


def probe_video(path: str, frame_dir_fps: float = 1.0) -> VideoInfo:
    """Frame count and frame rate of a video file or frame directory; errors name the path."""
    if os.path.isdir(path):
        n = len(list_frame_files(path))
        if n == 0:
            raise MediaError(f"frame directory {path} holds no frame images {FRAME_EXTENSIONS}", "zero_frame_video")
        return VideoInfo(n, frame_dir_fps, "frames")
    if not os.path.exists(path):
        raise MediaError(f"video file not found: {path}", "missing_file")
    if os.path.getsize(path) == 0:
        raise MediaError(f"video {path} is an empty file (0 frames)", "zero_frame_video")
    why = _ffmpeg_opens(path)
    if why is not None:
        reason = "zero_frame_video" if why == "no video stream" else "corrupt_video"
        raise MediaError(f"cannot read video {path}: {why}", reason)
    vr = _open_decord(path)
    info = VideoInfo(len(vr), float(vr.get_avg_fps()), "decord") if vr is not None else _pyav_info(path)
    if info.num_frames <= 0:
        raise MediaError(f"video {path} has 0 frames", "zero_frame_video")
    return info


def video_frame_indices(path: str, max_num_frames: int, max_fps: float = 1.0,
                        frame_dir_fps: float = 1.0) -> Tuple[List[int], VideoInfo]:
    """The sampled frame indices of a video (and its probe), without decoding pixels."""
    info = probe_video(path, frame_dir_fps)
    return sample_frame_indices(info.num_frames, info.fps, max_num_frames, max_fps), info


def _read_pyav(path: str, indices: Sequence[int]) -> List[np.ndarray]:
    import av

    wanted = set(indices)
    last = max(indices)
    frames = {}
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except Exception as e:
        raise MediaError(f"cannot decode video {path}: {e}", "corrupt_video") from None
    missing = [i for i in indices if i not in frames]
    if missing:
        raise MediaError(f"video {path} ended before frame {missing[0]} (decoded {len(frames)} of "
                         f"{len(indices)} sampled frames)", "corrupt_video")
    return [frames[i] for i in indices]


def _frame_file(files: Sequence[str], i: int, path: str) -> str:
    if not 0 <= i < len(files):
        raise MediaError(f"frame directory {path} has {len(files)} frames, frame {i} was planned", "corrupt_video")
    return files[i]


def check_frame_headers(path: str, indices: Sequence[int], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Read the headers of the sampled frames of a frame directory: MediaError for an enormous,
    missing or unreadable frame (the same `image.max_pixels` limit and reasons as images)."""
    files = list_frame_files(path)
    for i in indices:
        _frame_header(_frame_file(files, i, path), max_pixels, f"frame {i} of {path}")


def _frame_header(file: str, max_pixels: int, what: str) -> None:
    try:
        image_size_from_header(file, max_pixels, what=what)
    except MediaError as e:
        # A frame directory is a video: an unreadable frame makes it a corrupt video.
        raise MediaError(str(e), "corrupt_video" if e.reason == "corrupt_image" else e.reason) from None


def _decode_frame(file: str, max_pixels: int, min_size: int, what: str) -> np.ndarray:
    """One frame file as RGB uint8, header-checked first; JPEGs decoded at a reduced scale
    (DCT scaling, 1/2..1/8) when the frame is still at least `min_size` on both sides, since
    a frame only ever becomes one min_size x min_size tile."""
    _frame_header(file, max_pixels, what)
    try:
        with Image.open(file) as im:
            if min_size > 0 and im.format == "JPEG":
                im.draft("RGB", (min_size, min_size))
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise MediaError(f"{what} is enormous: {e}", "enormous_image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot decode {what}: {e}", "corrupt_video") from None


def read_frames(path: str, indices: Sequence[int], backend: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                min_size: int = 0) -> List[np.ndarray]:
    """Decode the given frame indices as RGB uint8 arrays [H, W, 3] with the probed backend.

    Frame-directory frames obey `max_pixels` like images (checked on the header, before any
    decoding) and, with `min_size`, JPEG frames decode no larger than needed for that tile size.
    """
    if not indices:
        return []
    if backend == "frames":
        files = list_frame_files(path)
        return [_decode_frame(_frame_file(files, i, path), max_pixels, min_size, f"frame {i} of {path}")
                for i in indices]
    if backend == "decord":
        vr = _open_decord(path)
        if vr is not None:
            try:
                batch = vr.get_batch(list(indices)).asnumpy()
                return [batch[k] for k in range(batch.shape[0])]
            except Exception as e:
                raise MediaError(f"cannot decode video {path} with decord: {e}", "corrupt_video") from None
    return _read_pyav(path, indices)


def frames_to_tiles(frames: Sequence[np.ndarray], image_size: int):
    """One normalised tile per frame: float32 [n, 3, size, size]."""
    pictures = [Image.fromarray(f) for f in frames]
    return normalize_uint8(tiles_to_uint8(pictures, image_size))


def load_video_frames(path, image_size: int, max_num_frames: int, max_fps: float = 1.0,
                      frame_dir_fps: float = 1.0, indices: Optional[Sequence[int]] = None,
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """Sampled frames of a video file or frame directory: (float32 [n, 3, size, size], indices).

    Raises MediaError (a ValueError naming the file) for missing, unreadable or 0-frame videos.
    `indices` skips the sampling rule (the loader passes what its planner already computed).
    """
    path = os.fspath(path)
    info = probe_video(path, frame_dir_fps)
    if indices is None:
        indices = sample_frame_indices(info.num_frames, info.fps, max_num_frames, max_fps)
    indices = list(indices)
    frames = read_frames(path, indices, info.backend, max_pixels, image_size)
    return frames_to_tiles(frames, image_size), indices
