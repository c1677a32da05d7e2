"""Per-region visual corruption at three visibility levels (docs/reference.md R2.1, "dynamic visual corruption").

- Which regions: a fraction (`region_fraction`, at least one) of the regions whose box overlaps no other region's
  box, so corrupting one region never damages another's glyphs; each draws its level from `weights`. The paper
  gives neither the selection rule nor the operators: these are our choices (docs/architecture.md, "Document data").
- Strengths scale with the region's text height `h`, so a level means the same at 150 and 300 dpi:
  - low (legible, Nougat/SynthDoG strength, docs/reference.md R8): slight warp, blur, noise and JPEG;
  - medium (glyph-level damage): paper-colour blobs wipe `medium_erase` of the area, then pixelation to cells of
    `medium_cell`*h and strong noise (tesseract CER ~0.6, reports/docs_data.md);
  - high (fully masked): the box is filled with the paper colour; no glyph pixel survives (tests check this).
- `corrupt_page` is pure: all randomness comes from `rngs(seed, "corrupt", page.source)`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from vlmcook.data.docs.page import Page, Region, rngs

LEVELS = ("low", "medium", "high")


@dataclass(frozen=True)
class CorruptConfig:
    levels: tuple[str, ...] = LEVELS
    weights: tuple[float, ...] = (0.4, 0.3, 0.3)
    region_fraction: float = 0.5
    low_warp: float = 0.04
    low_blur: float = 0.04
    low_noise: float = 10.0
    low_jpeg: tuple[int, int] = (30, 80)
    medium_erase: float = 0.15
    medium_cell: float = 0.15
    medium_noise: float = 20.0
    high_grain: float = 0.0  # > 0 adds paper-like grain (tesseract then 'reads' 'ee oe' from the noise)

    def __post_init__(self):
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad or not self.levels:
            raise ValueError(f"corruption levels {self.levels}: each must be one of {LEVELS}")
        if len(self.weights) != len(self.levels) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"level weights {self.weights} must be {len(self.levels)} non-negative numbers "
                             f"(one per level in {self.levels}) with a positive sum")
        if not 0 < self.region_fraction <= 1:
            raise ValueError(f"region_fraction {self.region_fraction} must be in (0, 1]")


@dataclass
class Corrupted:
    page: Page  # the clean page (its image is untouched)
    image: Image.Image  # the corrupted page image
    levels: dict[int, str] = field(default_factory=dict)  # region order -> level, for the chosen regions


def text_height(r: Region) -> float:
    """Typical glyph line height of a region, px."""
    if r.lines:
        return float(np.median([ln.bbox[3] - ln.bbox[1] for ln in r.lines]))
    w, h = r.bbox[2] - r.bbox[0], r.bbox[3] - r.bbox[1]
    # no line info: a glyph cell is ~0.55h wide and ~1.3h tall, so area ~ 0.7 h^2 per character
    return float(min(h, math.sqrt(w * h / (0.7 * max(1, len(r.text))))))


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def choose_regions(page: Page, cfg: CorruptConfig, rng) -> dict[int, str]:
    """Region order -> level for the regions to corrupt."""
    regs = page.in_reading_order()
    free = [r for r in regs if not any(o is not r and _overlaps(r.bbox, o.bbox) for o in regs)]
    if not free:
        return {}
    n = max(1, round(cfg.region_fraction * len(free)))
    chosen = sorted(rng.sample(free, n), key=lambda r: r.order)
    return {r.order: rng.choices(cfg.levels, weights=cfg.weights)[0] for r in chosen}


def _paper_colour(a: np.ndarray, box, ring: int = 6) -> tuple[np.ndarray, float]:
    """Median colour and grain (robust std) of a ring of pixels just outside `box` on page array a [H, W, 3]."""
    x1, y1, x2, y2 = box
    H, W = a.shape[:2]
    outer = a[max(0, y1 - ring):min(H, y2 + ring), max(0, x1 - ring):min(W, x2 + ring)].reshape(-1, 3)
    if outer.shape[0] <= (x2 - x1) * (y2 - y1):  # box fills the page: fall back to the box's brightest decile
        inner = a[y1:y2, x1:x2].reshape(-1, 3)
        outer = inner[inner.sum(1) >= np.quantile(inner.sum(1), 0.9)]
    med = np.median(outer, 0)
    grain = 1.4826 * float(np.median(np.abs(outer - med)))
    return med.astype(np.float32), grain


def _bilinear(a: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample a [H, W, C] at float coordinates ys, xs [H, W] (clamped)."""
    H, W = a.shape[:2]
    ys, xs = np.clip(ys, 0, H - 1.001), np.clip(xs, 0, W - 1.001)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    return ((a[y0, x0] * (1 - fx) + a[y0, x0 + 1] * fx) * (1 - fy)
            + (a[y0 + 1, x0] * (1 - fx) + a[y0 + 1, x0 + 1] * fx) * fy)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return a
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32)


def low(crop: np.ndarray, h: float, cfg: CorruptConfig, rng: np.random.Generator) -> np.ndarray:
    H, W = crop.shape[:2]
    amp, per = rng.uniform(0, cfg.low_warp) * h, rng.uniform(2, 6) * h  # displacement px, wavelength px
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ph = rng.uniform(0, 2 * np.pi, 2)
    dy, dx = amp * np.sin(xx / per * 2 * np.pi + ph[0]), amp * np.sin(yy / per * 2 * np.pi + ph[1])
    a = _bilinear(crop, yy + dy, xx + dx)
    a = _blur(a, rng.uniform(0, cfg.low_blur) * h)
    a = a + rng.standard_normal(a.shape, dtype=np.float32) * rng.uniform(0, cfg.low_noise)
    return _jpeg(a, int(rng.integers(cfg.low_jpeg[0], cfg.low_jpeg[1] + 1)))


def _blob_mask(H: int, W: int, scale: float, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [H, W] mask covering ~`frac` of the area with smooth blobs of size ~`scale` px."""
    gh, gw = max(2, math.ceil(H / scale) + 1), max(2, math.ceil(W / scale) + 1)
    field_ = Image.fromarray(rng.random((gh, gw), dtype=np.float32)).resize((W, H), Image.BICUBIC)
    f = np.asarray(field_)
    return f < np.quantile(f, frac)


def medium(crop: np.ndarray, h: float, paper: np.ndarray, cfg: CorruptConfig, rng: np.random.Generator) -> np.ndarray:
    H, W = crop.shape[:2]
    a = crop.copy()
    a[_blob_mask(H, W, 0.35 * h, cfg.medium_erase, rng)] = paper
    cell = max(2.0, cfg.medium_cell * h * rng.uniform(0.85, 1.15))
    small = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).resize(
        (max(1, round(W / cell)), max(1, round(H / cell))), Image.BOX)
    a = np.asarray(small.resize((W, H), Image.BILINEAR), dtype=np.float32)
    return a + rng.standard_normal(a.shape, dtype=np.float32) * cfg.medium_noise * rng.uniform(0.7, 1.0)


def high(shape, paper: np.ndarray, grain: float, cfg: CorruptConfig, rng: np.random.Generator) -> np.ndarray:
    return paper + rng.standard_normal(shape, dtype=np.float32) * min(grain, cfg.high_grain)


def corrupt_region(clean: np.ndarray, out: np.ndarray, r: Region, level: str, cfg: CorruptConfig,
                   rng: np.random.Generator) -> None:
    """Write region `r` of page array `clean` [H, W, 3] float32, corrupted at `level`, into `out` (same shape).

    The paper colour is read from the clean page, so a neighbour's corruption never leaks into a mask."""
    x1, y1, x2, y2 = r.bbox
    crop, h = clean[y1:y2, x1:x2], text_height(r)
    paper, grain = _paper_colour(clean, r.bbox)
    if level == "low":
        res = low(crop, h, cfg, rng)
    elif level == "medium":
        res = medium(crop, h, paper, cfg, rng)
    else:
        res = high(crop.shape, paper, grain, cfg, rng)
    out[y1:y2, x1:x2] = np.clip(res, 0, 255)


def corrupt_page(page: Page, seed: int, cfg: CorruptConfig = CorruptConfig()) -> Corrupted:
    """Choose regions and levels for `page` and corrupt them; depends only on (seed, page.source, page)."""
    rng, nrng = rngs(seed, "corrupt", page.source)
    levels = choose_regions(page, cfg, rng)
    clean = np.asarray(page.image, dtype=np.float32)
    out = clean.copy()
    by_order = {r.order: r for r in page.regions}
    for order, level in levels.items():
        corrupt_region(clean, out, by_order[order], level, cfg, nrng)
    return Corrupted(page, Image.fromarray(out.round().astype(np.uint8)), levels)
