"""Video: the sampling rule by hand, and real MP4s written with PyAV then decoded with decord and with
the PyAV fallback; frame directories; 0-frame and unreadable videos fail naming the file."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from datatest_media import frame_number, make_counter_video
from megatron_vita.data.image import MediaError
from megatron_vita.data.video import (
    list_frame_files, load_video_frames, probe_video, read_frames, sample_frame_indices,
)


@pytest.mark.parametrize("n,fps,max_frames,max_fps,expected", [
    (30, 10.0, 8, 1.0, [0, 10, 20]),                      # fps bound: step 10
    (30, 10.0, 8, 5.0, [0, 3, 6, 10, 13, 16, 20, 23]),    # frame bound: step 30/9
    (100, 1.0, 4, 1.0, [0, 20, 40, 60]),                  # long 1 fps video: step 100/5
    (3, 30.0, 128, 1.0, [0]),                             # shorter than a second
    (10, 0.0, 4, 1.0, [0, 2, 4, 6]),                      # unknown fps counts as 1 fps: step 10/5
    (8, 2.0, 4, 1.0, [0, 2, 4, 6]),                       # the demo clips
    (0, 25.0, 8, 1.0, []),
])
def test_sampling_rule(n, fps, max_frames, max_fps, expected):
    assert sample_frame_indices(n, fps, max_frames, max_fps) == expected


def test_sampling_limits():
    idx = sample_frame_indices(36000, 30.0, 4096, 1.0)  # 20 minutes at 30 fps
    assert len(idx) == 1200 and idx[:3] == [0, 30, 60]   # <= 1 fps from frame 0
    idx = sample_frame_indices(360000, 30.0, 512, 1.0)
    assert len(idx) == 512 and idx[0] == 0 and idx[-1] < 360000
    with pytest.raises(ValueError):
        sample_frame_indices(10, 1.0, 0)


def test_real_mp4_decord_and_pyav_agree(tmp_path):
    path = make_counter_video(str(tmp_path / "count.mp4"), 30, 10)
    info = probe_video(path)
    assert (info.num_frames, info.fps) == (30, 10.0)
    tiles, idx = load_video_frames(path, 56, max_num_frames=8, max_fps=5.0)
    assert idx == [0, 3, 6, 10, 13, 16, 20, 23] and tiles.shape == (8, 3, 56, 56)
    via_decord = read_frames(path, idx, "decord")
    via_pyav = read_frames(path, idx, "pyav")
    assert [frame_number(f) for f in via_decord] == idx == [frame_number(f) for f in via_pyav]
    assert via_decord[0].shape == (48, 64, 3)
    # One tile per frame: padded to a square (mean colour bands top and bottom), then resized.
    from megatron_vita.data.image import denormalize_to_uint8

    t = denormalize_to_uint8(tiles)
    assert abs(int(t[5, 0, 28, 0]) - 123) <= 3 and abs(int(t[5, 28, 28, 0]) - 8 * 16) <= 6


def test_frame_directory_natural_order(tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    for i in range(12):
        a = np.zeros((20, 20, 3), np.uint8)
        a[..., 0] = 8 * i
        Image.fromarray(a).save(d / f"frame_{i}.png")
    (d / "notes.txt").write_text("not a frame")
    files = [os.path.basename(p) for p in list_frame_files(str(d))]
    assert files[:3] == ["frame_0.png", "frame_1.png", "frame_2.png"] and files[-1] == "frame_11.png"
    tiles, idx = load_video_frames(str(d), 28, max_num_frames=4, max_fps=1.0, frame_dir_fps=2.0)
    assert idx == [0, 2, 4, 7]  # step = max(2/1, 12/5)
    assert probe_video(str(d), frame_dir_fps=2.0).backend == "frames"
    from megatron_vita.data.image import denormalize_to_uint8

    assert [int(round(x[..., 0].mean() / 8)) for x in denormalize_to_uint8(tiles)] == idx


def test_bad_videos_name_the_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.mp4") as e:
        load_video_frames(str(empty), 56, 4)
    assert e.value.reason == "zero_frame_video"
    junk = tmp_path / "junk.mp4"
    # Fixed bytes: random ones are now and then probed by ffmpeg as a stream with no frames.
    junk.write_bytes(b"this is not a video file\n" * 200)
    with pytest.raises(MediaError, match="junk.mp4") as e:
        load_video_frames(str(junk), 56, 4)
    assert e.value.reason == "corrupt_video"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(MediaError, match="nothing") as e:
        probe_video(str(tmp_path / "nothing"))
    assert e.value.reason == "zero_frame_video"
    with pytest.raises(MediaError, match="absent.mp4") as e:
        probe_video(str(tmp_path / "absent.mp4"))
    assert e.value.reason == "missing_file"


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds no pixel data (a giant frame, cheaply)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the module filter
def test_frame_directories_obey_max_pixels_before_decoding(tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 8 * i, np.uint8)).save(d / f"{i}.png")
    _png_header_only(d / "1.png", 12000, 12000)
    with pytest.raises(MediaError, match=r"frame 1 of .*clip is enormous: 12000x12000 > 67108864 pixels") as e:
        read_frames(str(d), [0, 1, 2], "frames")
    assert e.value.reason == "enormous_image"
    with pytest.raises(MediaError, match="frame 1 of") as e:
        load_video_frames(str(d), 28, max_num_frames=4, max_pixels=20 * 20)
    assert e.value.reason == "enormous_image"
    assert len(read_frames(str(d), [0, 2], "frames", max_pixels=20 * 20)) == 2


def test_jpeg_frames_decode_no_larger_than_their_tile(tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    Image.fromarray(np.full((1200, 1600, 3), (200, 40, 40), np.uint8)).save(d / "0.jpg", quality=90)
    Image.fromarray(np.full((120, 160, 3), (200, 40, 40), np.uint8)).save(d / "1.png")
    big, small = read_frames(str(d), [0, 1], "frames", min_size=56)
    assert big.shape == (150, 200, 3)  # 1/8 scale: still >= 56 on both sides, 64x fewer pixels
    assert small.shape == (120, 160, 3)  # only JPEG has reduced-scale decoding
    assert read_frames(str(d), [0], "frames", min_size=448)[0].shape == (600, 800, 3)
    assert read_frames(str(d), [0], "frames")[0].shape == (1200, 1600, 3)
    tiles, _ = load_video_frames(str(d), 56, max_num_frames=1)
    from megatron_vita.data.image import denormalize_to_uint8

    assert np.abs(denormalize_to_uint8(tiles)[0, 28, 28].astype(int) - (200, 40, 40)).max() <= 3


def test_bad_videos_leave_stderr_quiet(tmp_path, capfd):
    junk, png = tmp_path / "junk.mp4", tmp_path / "picture.mp4"
    # Fixed bytes: random ones are now and then probed by ffmpeg as a stream with no frames.
    junk.write_bytes(b"this is not a video file\n" * 200)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "PNG")
    # A truncated PNG: ffmpeg reads it as a 1-frame image stream (PyAV decodes it) after decord's
    # ffmpeg logged half a dozen lines about it.
    png.write_bytes(buf.getvalue()[:200])
    capfd.readouterr()
    with pytest.raises(MediaError, match="junk.mp4") as e:
        probe_video(str(junk))
    assert e.value.reason == "corrupt_video"
    assert probe_video(str(png)).backend == "pyav"
    assert capfd.readouterr().err == ""  # C-level writes to fd 2 included
