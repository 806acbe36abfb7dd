"""Tiling: the grid rule on edge aspect ratios and the tie rule, thumbnail first, mean-colour padding,
normalisation against a plain PIL + numpy computation, and errors naming the bad file."""
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vita.data.image import (
    IMAGENET_MEAN, IMAGENET_STD, PAD_COLOUR, MediaError, candidate_grids, choose_grid, image_size_from_header,
    load_image_tiles, pad_to_square,
)


@pytest.mark.parametrize("w,h,size,expected", [
    (448, 448, 448, (1, 1)),      # square, small: tie (1,1)/(2,2) needs area > 0.5*448^2*4
    (896, 896, 448, (2, 2)),      # 802816 > 401408 -> 2x2; not > 903168 for 3x3
    (1000, 1000, 448, (3, 3)),    # 1e6 > 903168 -> 3x3
    (79, 79, 56, (1, 1)),         # 6241 < 0.5*56^2*4 = 6272
    (80, 80, 56, (2, 2)),         # 6400 > 6272
    (200, 100, 448, (1, 2)),      # 2:1 small -> 1 row x 2 cols; (4,2) not large enough
    (1800, 900, 448, (2, 4)),     # 2:1 large -> 2 rows x 4 cols
    (1344, 448, 448, (1, 3)),     # exactly 3:1, not > 0.5*448^2*12 -> 1x3 (not 2x6)
    (2688, 896, 448, (2, 6)),     # 3:1 and large -> 2x6
    (5000, 100, 448, (1, 12)),    # 50:1 -> the widest grid
    (100, 5000, 448, (12, 1)),    # 1:50 -> the tallest grid
    (1000, 700, 448, (2, 3)),     # 1.43: 3/2 (diff .071) beats 4/3 (diff .095)
    (1, 1, 448, (1, 1)),
])
def test_grid_choice(w, h, size, expected):
    assert choose_grid(w, h, size, 1, 12) == expected


def test_grid_respects_tile_bounds():
    assert choose_grid(5000, 100, 448, 1, 6) == (1, 6)
    assert choose_grid(100, 100, 448, 2, 12) == (2, 2)  # 1x1 excluded: the square 2x2 is exact
    assert all(2 <= c * r <= 4 for c, r in candidate_grids(2, 4))
    with pytest.raises(ValueError):
        candidate_grids(3, 2)


def _ref_normalise(img: Image.Image, size: int) -> np.ndarray:
    """Straightforward per-tile PIL + numpy reference (float32, like the released code)."""
    a = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return ((a - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)).transpose(2, 0, 1)


def test_tiles_thumbnail_first_and_values(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (120, 170, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    tiles, grid = load_image_tiles(str(path), 56, max_num=6)
    assert grid == (2, 3) and tiles.shape == (7, 3, 56, 56) and tiles.dtype == torch.float32
    img = Image.open(path).convert("RGB")
    np.testing.assert_allclose(tiles[0].numpy(), _ref_normalise(img, 56), atol=1e-6)  # thumbnail
    big = img.resize((56 * 3, 56 * 2), Image.Resampling.BICUBIC)
    for k, (r, c) in enumerate([(r, c) for r in range(2) for c in range(3)]):
        crop = big.crop((c * 56, r * 56, (c + 1) * 56, (r + 1) * 56))
        np.testing.assert_allclose(tiles[1 + k].numpy(), _ref_normalise(crop, 56), atol=1e-6)
    one, g1 = load_image_tiles(img, 56, max_num=1)
    assert g1 == (1, 1) and one.shape == (1, 3, 56, 56)


def test_pad_to_square_uses_the_mean_colour():
    img = Image.fromarray(np.full((10, 30, 3), 255, np.uint8))
    sq = np.asarray(pad_to_square(img))
    assert sq.shape == (30, 30, 3)
    assert tuple(sq[0, 0]) == PAD_COLOUR == (123, 116, 103)
    assert (sq[10:20] == 255).all() and (sq[:10] == PAD_COLOUR).all()


def test_bad_images_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(MediaError, match="garbage.jpg") as e:
        image_size_from_header(str(garbage))
    assert e.value.reason == "corrupt_image"
    with pytest.raises(MediaError, match="missing.png") as e:
        load_image_tiles(str(tmp_path / "missing.png"), 56)
    assert e.value.reason == "missing_file"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(MediaError, match="enormous") as e:
        image_size_from_header(str(tmp_path / "big.png"), max_pixels=5000)
    assert e.value.reason == "enormous_image"
