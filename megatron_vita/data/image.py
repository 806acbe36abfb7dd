"""Image tiling for Long-VITA: dynamic resolution grid, thumbnail first, ImageNet normalisation.

Owns the pixel side of an `<image>`: which tile grid an image gets, how it is cut into tiles, and
how tiles become a normalised float tensor. Follows the released preprocessing (longvita.md):

- candidate grids (cols, rows) with min_num <= cols*rows <= max_num, ordered by area; the grid
  whose aspect ratio is closest to W/H wins; on an exactly equal distance a later (larger) grid
  wins when W*H > 0.5 * size^2 * cols * rows;
- the image is resized (bicubic) to (size*cols, size*rows) and cut row-major into size x size
  tiles; when there is more than one tile, a size x size thumbnail of the whole image is
  PREPENDED (InternVL appends it);
- every tile (and every video frame, see video.py) is padded to a square with the mean colour
  (the normalisation mean x 255, so padding normalises to ~0), resized (bicubic) to size, then
  /255 and normalised with the ImageNet mean/std in float32.

Tiles of one micro-batch are normalised in one vectorised torch op rather than per tile.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

# PIL warns about pictures over its own 89M-pixel limit when their header is read; every header
# read here is followed by the `max_pixels` check, which refuses (and counts) such a picture, so
# the warning would only add an uncounted second report of it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# expand2square background: the normalisation mean as a colour.
PAD_COLOUR = tuple(int(x * 255) for x in IMAGENET_MEAN)
# Default ceiling on decoded pixels (W*H); beyond it an image is refused as "enormous".
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


class MediaError(ValueError):
    """A media file that cannot be used; `reason` is the counter it is reported under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def candidate_grids(min_num: int = 1, max_num: int = 12) -> List[Tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, by area (ties: by cols)."""
    if min_num < 1 or max_num < min_num:
        raise ValueError(f"tile range must satisfy 1 <= min_num <= max_num, got {min_num}..{max_num}")
    grids = [(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if min_num <= c * r <= max_num]
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0]))


def choose_grid(width: int, height: int, image_size: int, min_num: int = 1, max_num: int = 12) -> Tuple[int, int]:
    """The (rows, cols) tile grid the dynamic-resolution rule picks for a W x H image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = None, float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def num_tiles_for_grid(grid: Tuple[int, int], use_thumbnail: bool = True) -> int:
    """Tiles an image with this (rows, cols) grid contributes (thumbnail included)."""
    n = grid[0] * grid[1]
    return n + 1 if use_thumbnail and n > 1 else n


def pad_to_square(img: Image.Image, colour: Sequence[int] = PAD_COLOUR) -> Image.Image:
    """Centre the image on a square canvas of the mean colour (no-op for square images)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(colour))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def cut_tiles(img: Image.Image, grid: Tuple[int, int], image_size: int, use_thumbnail: bool = True) -> List[Image.Image]:
    """Resize to the grid and crop row-major; thumbnail first when there is more than one tile."""
    rows, cols = grid
    resized = img.resize((image_size * cols, image_size * rows), resample=Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows) for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        thumb = img.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
        tiles.insert(0, thumb)
    return tiles


def tiles_to_uint8(images: Sequence[Image.Image], image_size: int) -> np.ndarray:
    """Pad each picture to a square, resize to image_size: uint8 array [n, size, size, 3]."""
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        if im.mode != "RGB":
            im = im.convert("RGB")
        im = pad_to_square(im)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
        out[i] = np.asarray(im)
    return out


def normalize_uint8(pixels):
    """uint8 [n, H, W, 3] (numpy or torch) -> float32 [n, 3, H, W], /255 then ImageNet mean/std."""
    import torch

    t = torch.as_tensor(pixels)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((t.shape[0], 3, t.shape[1], t.shape[2]), dtype=torch.float32)
    # One converting transpose into contiguous memory, then in-place passes: several times faster
    # than arithmetic on the permuted view, and the same float32 arithmetic as the released per-tile
    # numpy code (x / 255, minus mean, over std), so the values are identical.
    out.copy_(t.permute(0, 3, 1, 2))
    return out.div_(255.0).sub_(mean).div_(std)


def normalize_pixels(pixels):
    """uint8 [n, 3, H, W] on any device -> float32 normalised (for loaders built with normalize=False)."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def image_size_from_header(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, what: str = "") -> Tuple[int, int]:
    """(width, height) read from the file header only; refuses enormous or unreadable images.

    `what` names the picture in messages (default `image PATH`; video frames pass their own).
    """
    what = what or f"image {path}"
    try:
        with Image.open(path) as im:
            size = im.size
    except FileNotFoundError:
        raise MediaError(f"{what}: file not found", "missing_file") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"{what} is enormous: {e}", "enormous_image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot read {what}: {e}", "corrupt_image") from None
    if size[0] * size[1] > max_pixels:
        raise MediaError(f"{what} is enormous: {size[0]}x{size[1]} > {max_pixels} pixels", "enormous_image")
    if size[0] <= 0 or size[1] <= 0:
        raise MediaError(f"{what} has an empty size {size}", "corrupt_image")
    return size


def open_rgb(image: Union[str, os.PathLike, Image.Image], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully as RGB, turning every decoder failure into a MediaError naming the file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    path = os.fspath(image)
    image_size_from_header(path, max_pixels)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise MediaError(f"image {path} is enormous: {e}", "enormous_image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(f"cannot decode image {path}: {e}", "corrupt_image") from None


def load_image_pictures(image, image_size: int, max_num: int = 12, min_num: int = 1, use_thumbnail: bool = True,
                        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Tuple[List[Image.Image], Tuple[int, int]]:
    """The tiles of one image as PIL pictures (thumbnail first) and the (rows, cols) grid."""
    img = open_rgb(image, max_pixels)
    grid = choose_grid(img.size[0], img.size[1], image_size, min_num, max_num)
    return cut_tiles(img, grid, image_size, use_thumbnail), grid


def load_image_tiles(image, image_size: int, max_num: int = 12, min_num: int = 1, use_thumbnail: bool = True):
    """Tiles of one image: (float32 [n, 3, size, size] normalised, (rows, cols) grid).

    `image` is a path or a PIL image. With more than one grid tile the thumbnail is tile 0,
    followed by the grid tiles row-major, which is the order of their token blocks.
    """
    pictures, grid = load_image_pictures(image, image_size, max_num, min_num, use_thumbnail)
    return normalize_uint8(tiles_to_uint8(pictures, image_size)), grid


def denormalize_to_uint8(tiles) -> np.ndarray:
    """Inverse of the normalisation for viewing: float [n, 3, H, W] -> uint8 [n, H, W, 3]."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (tiles.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()

