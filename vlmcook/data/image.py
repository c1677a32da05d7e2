"""Image preprocessing of MiniCPM-V 4.5: LLaVA-UHD slicing, the released resize/rounding rules, normalisation.

Notable (docs/reference.md 6):
- The numbers are the released ones, quirks included, because the weights were trained on them: Python's
  `round` (banker's rounding: 34.5 -> 34) in `ensure_divide` and `int()` truncation in `best_resize`.
- Every resize is PIL BICUBIC on uint8 RGB (other resamplers are not bit-exact). RGBA drops alpha (no compositing).
- A view is a float32 tensor `[3, 14*h, 14*w]` in [-1, 1]; the released processor's "patch strip" layout is the
  model's business (docs/architecture.md). Normalisation goes through a 256-entry table that holds exactly the
  released float32 arithmetic `(x / 255 - 0.5) / 0.5`, so it is bit-exact and one gather per view.
- Fixed vs the release (docs/reference.md 10.18): the channel layout is never guessed from array shapes, so
  images with sides of 1-3 px work. Bad input raises `ImageError` naming the source: unreadable, truncated or
  unsupported files, and decompression bombs (more than `MAX_IMAGE_PIXELS` pixels, checked from the header
  before any pixel is decoded).
- Files and bytes are turned upright with their EXIF orientation (what every viewer shows); PIL images are used
  as given, like the reference does.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; a 48-MP phone photo passes, a crafted 50k x 50k header does not
IMAGE_MARKER = "(<image>./</image>)"  # the released prompt marker one image stands for

# (x / 255 - 0.5) / 0.5 in float32, step by step as the released processor computes it.
_LUT = ((np.arange(256, dtype=np.float32) / np.float32(255)) - np.float32(0.5)) / np.float32(0.5)


class ImageError(ValueError):
    """An image could not be read or is unusable; the message names the source."""


# ---- loading ----------------------------------------------------------------------------------------------------
def describe(src: Any) -> str:
    """A short human name for an image source, used in every error message."""
    if isinstance(src, (str, Path)):
        return f"image file {str(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes (len {len(src)})"
    if isinstance(src, Image.Image):
        return f"PIL image {src.width}x{src.height} mode {src.mode}"
    if isinstance(src, np.ndarray):
        return f"array {tuple(src.shape)} {src.dtype}"
    return f"object of type {type(src).__name__}"


def _open(src: Any, name: str) -> Image.Image:
    """Open a file/bytes lazily (header only) and check its pixel count before anything is decoded."""
    if isinstance(src, (str, Path)):
        if not Path(src).is_file():
            raise ImageError(f"{name}: {'a folder, not a file' if Path(src).is_dir() else 'no such file'}")
        fp: Any = str(src)
    else:
        fp = io.BytesIO(bytes(src))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refusing a decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a format PIL can read") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot open ({e})") from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageError(f"{name}: {img.width}x{img.height} = {img.width * img.height:,} pixels is more than the "
                         f"limit of {MAX_IMAGE_PIXELS:,} (vlmcook.data.image.MAX_IMAGE_PIXELS); refusing a "
                         f"possible decompression bomb")
    return img


def image_size(src: Any, name: str | None = None) -> tuple[int, int]:
    """(width, height) as the processor will see it, reading only the header of files/bytes (EXIF rotation
    applied)."""
    name = name or describe(src)
    if isinstance(src, Image.Image):
        if 0 in src.size:
            raise ImageError(f"{name}: an empty image has nothing to show")
        return src.size
    if isinstance(src, np.ndarray):
        return load_image(src, name).size
    if not isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        raise ImageError(f"{name}: expected a PIL image, a path, bytes or a uint8 array")
    with _open(src, name) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation; 5..8 swap the sides
        except Exception:  # a broken EXIF block is ignored the same way exif_transpose ignores it
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(src: Any, name: str | None = None) -> Image.Image:
    """Any supported source -> an RGB PIL image. Sources: PIL image, path, encoded bytes, uint8 array [H, W] or
    [H, W, C] with C in 1, 3, 4 (channels last, never guessed)."""
    name = name or describe(src)
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        img = _from_array(src, name)
    elif isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        img = _open(src, name)
        try:
            img.load()  # decodes now, so a truncated file fails here and not in the middle of a resize
            ImageOps.exif_transpose(img, in_place=True)  # no copy of the pixels when already upright
        except (OSError, ValueError, SyntaxError) as e:
            img.close()
            raise ImageError(f"{name}: corrupt or truncated image data ({e})") from None
    else:
        raise ImageError(f"{name}: expected a PIL image, a path, bytes or a uint8 array")
    return to_rgb(img, name)


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"{name}: arrays must be uint8 (got {a.dtype})")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise ImageError(f"{name}: arrays must be [H, W] or [H, W, C] with C in 1, 3, 4 (channels last)")
    return Image.fromarray(np.ascontiguousarray(a))


def to_rgb(img: Image.Image, name: str | None = None) -> Image.Image:
    """PIL `.convert("RGB")` like the release (alpha dropped, palette expanded); no copy if already RGB."""
    if img.mode == "RGB":
        return img
    try:
        if img.mode.startswith("I;16"):  # 16-bit grey: PIL would clip at 255; map 0..65535 to 0..255 instead
            img = Image.fromarray((np.asarray(img, dtype=np.uint32) // 257).astype(np.uint8))
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{name or describe(img)}: cannot convert mode {img.mode} to RGB ({e})") from None


# ---- the released size rules (docs/reference.md 6.2) ------------------------------------------------------------
def ensure_divide(length: float, patch: int) -> int:
    """Nearest multiple of `patch`, at least `patch`. Python's round() is banker's rounding, on purpose."""
    return max(round(length / patch) * patch, patch)


def best_resize(size: tuple[float, float], scale: int = 448, patch: int = 14,
                upscale: bool = False) -> tuple[int, int]:
    """(W, H) -> (W', H') multiples of `patch` with area about scale^2 (only shrinks unless `upscale`)."""
    w, h = size
    if w * h > scale * scale or upscale:
        r = w / h
        h = int(scale / math.sqrt(r))  # int() truncation, as released
        w = int(h * r)
    return ensure_divide(w, patch), ensure_divide(h, patch)


def slice_grid(size: tuple[int, int], scale: int = 448, max_slice_nums: int = 9) -> tuple[int, int] | None:
    """(cols, rows) of the slice grid, or None when the image is not sliced. Among slice counts
    {m-1, m, m+1} (m = ceil(area / scale^2) capped at max_slice_nums; 1 and counts > max excluded), the
    factor pair whose aspect is closest in log space wins; the first one wins ties."""
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    w, h = size
    multiple = min(math.ceil(w * h / (scale * scale)), max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(w / h)
    best, best_err = None, float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slice_nums:
            continue
        for cols in range(1, n + 1):
            if n % cols:
                continue
            err = abs(log_ratio - math.log(cols / (n // cols)))
            if err < best_err:  # strict: the first pair in (count, cols) order wins a tie
                best, best_err = (cols, n // cols), err
    return best


def refine_size(size: tuple[int, int], grid: tuple[int, int], scale: int = 448, patch: int = 14) -> tuple[int, int]:
    """Size the whole image is resized to before it is cut into `grid` equal cells."""
    cols, rows = grid
    cell = (ensure_divide(size[0], cols) / cols, ensure_divide(size[1], rows) / rows)
    cw, ch = best_resize(cell, scale, patch, upscale=True)
    return cw * cols, ch * rows


@dataclass(frozen=True)
class ImageLayout:
    """What an image becomes, decided from its size alone: view sizes (W, H) in pixels, overview first, then the
    slices row-major; `grid` = (cols, rows) or None."""

    size: tuple[int, int]
    grid: tuple[int, int] | None
    view_sizes: tuple[tuple[int, int], ...]
    patch: int = 14

    @property
    def tgt_sizes(self) -> list[tuple[int, int]]:  # (h, w) in patches, per view
        return [(h // self.patch, w // self.patch) for w, h in self.view_sizes]

    @property
    def n_views(self) -> int:
        return len(self.view_sizes)


def image_layout(size: tuple[int, int], scale: int = 448, max_slice_nums: int = 9, patch: int = 14) -> ImageLayout:
    grid = slice_grid(size, scale, max_slice_nums)
    if grid is None:  # one view, scaled (up or down) to about scale^2
        return ImageLayout(size, None, (best_resize(size, scale, patch, upscale=True),), patch)
    cols, rows = grid
    rw, rh = refine_size(size, grid, scale, patch)
    cells = ((rw // cols, rh // rows),) * (cols * rows)
    return ImageLayout(size, grid, (best_resize(size, scale, patch),) + cells, patch)


# ---- pixels -----------------------------------------------------------------------------------------------------
def view_images(img: Image.Image, layout: ImageLayout) -> list[Image.Image]:
    """PIL views: the overview, then the refined image cut row-major into the grid cells."""
    views = [img.resize(layout.view_sizes[0], resample=Image.Resampling.BICUBIC)]
    if layout.grid is not None:
        cols, rows = layout.grid
        cw, ch = layout.view_sizes[1]
        refined = img.resize((cw * cols, ch * rows), resample=Image.Resampling.BICUBIC)
        views += [refined.crop((c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)) for r in range(rows) for c in range(cols)]
    return views


def normalize(img: Image.Image) -> torch.Tensor:
    """RGB uint8 PIL image [H, W, 3] -> float32 tensor [3, H, W] in [-1, 1] (bit-exact with the release)."""
    chw = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # [3, H, W] uint8
    return torch.from_numpy(_LUT[chw])  # one table gather, ~2x faster than float arithmetic


@dataclass(frozen=True)
class ImageViews:
    views: list[torch.Tensor]  # each [3, 14h, 14w]
    layout: ImageLayout

    @property
    def tgt_sizes(self) -> list[tuple[int, int]]:
        return self.layout.tgt_sizes


def preprocess_image(src: Any, scale: int = 448, max_slice_nums: int = 9, patch: int = 14,
                     name: str | None = None) -> ImageViews:
    """One image source -> its normalised views (overview first, then slices row-major)."""
    img = load_image(src, name)
    layout = image_layout(img.size, scale, max_slice_nums, patch)
    return ImageViews([normalize(v) for v in view_images(img, layout)], layout)


# ---- text -------------------------------------------------------------------------------------------------------
def image_placeholder(grid: tuple[int, int] | None, query_num: int, image_id: int | None = None) -> str:
    """The released placeholder text (docs/reference.md 6.4): optional `<image_id>i</image_id>`, the overview
    block, then the slice rows (no newline after `</image>`, a single `\\n` between rows)."""
    unk = "<unk>" * query_num
    text = "" if image_id is None else f"<image_id>{image_id}</image_id>"
    text += f"<image>{unk}</image>"
    if grid is not None:
        cols, rows = grid
        text += "\n".join(f"<slice>{unk}</slice>" * cols for _ in range(rows))
    return text
