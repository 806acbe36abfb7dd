"""Helpers for the data tests: self-identifying videos made with PyAV."""
import numpy as np


def make_counter_video(path: str, n: int, fps: int, w: int = 64, h: int = 48) -> str:
    """A real H.264 MP4 whose frame i has red level 8*i (frames identify themselves when decoded)."""
    from megatron_vita.data.demo import write_mp4

    frames = []
    for i in range(n):
        a = np.zeros((h, w, 3), dtype=np.uint8)
        a[..., 0] = min(8 * i, 255)
        frames.append(a)
    write_mp4(path, frames, fps)
    return path


def frame_number(tile_or_frame) -> int:
    """Inverse of make_counter_video's red level on the middle row (clear of square padding)."""
    a = np.asarray(tile_or_frame)
    return int(round(float(a[a.shape[0] // 2, :, 0].mean()) / 8))
