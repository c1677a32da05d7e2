"""The structure every page source yields, plus the seeding rule shared by the whole docs pipeline.

Notable:
- A `Page` is an RGB image plus `Region`s (text, pixel bbox, reading order, kind). Synthetic, PDF and JSONL
  sources all produce it, so corruption and sample writing never know where a page came from.
- Boxes are `(x1, y1, x2, y2)` integer pixels, end-exclusive, origin top-left; `Page.validate` checks them.
- Region text is the *unwrapped* text: the lines of a paragraph are joined with one space (the visual line breaks
  are layout, not content); `Region.lines` keeps the per-line text and boxes for line-level use.
- `rngs(seed, *key)` derives independent `random.Random` / `numpy.random.Generator` streams from a seed and a
  key such as `("layout", page_index)`: the same seed gives the same pages in any order and any process count.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

KINDS = ("title", "paragraph", "list", "table_cell", "caption", "header", "footer")


@dataclass(frozen=True)
class Line:
    text: str
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class Region:
    text: str
    bbox: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, end-exclusive
    order: int  # reading order, 0-based, unique within a page
    kind: str  # one of KINDS
    lines: tuple[Line, ...] = ()
    cell: tuple[int, int, int] | None = None  # (table id, row, col) for table cells


@dataclass
class Page:
    image: Image.Image  # RGB
    regions: list[Region]
    source: str  # e.g. "synthetic:12", "pdf:report.pdf#3", "jsonl:scans.jsonl:7"
    meta: dict = field(default_factory=dict)

    def validate(self) -> "Page":
        """Raise ValueError naming the page and region if a box or kind is wrong; return self."""
        w, h = self.image.size
        if self.image.mode != "RGB":
            raise ValueError(f"{self.source}: image mode {self.image.mode!r}, expected 'RGB'")
        orders = [r.order for r in self.regions]
        if len(set(orders)) != len(orders):
            raise ValueError(f"{self.source}: duplicate reading-order values {sorted(orders)}")
        for r in self.regions:
            x1, y1, x2, y2 = r.bbox
            if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                raise ValueError(f"{self.source}: region {r.order} bbox {r.bbox} outside the {w}x{h} image or empty")
            for ln in r.lines:  # a clipped line would put text in the target that the image does not show
                lx1, ly1, lx2, ly2 = ln.bbox
                if not (0 <= lx1 < lx2 <= w and 0 <= ly1 < ly2 <= h):
                    raise ValueError(f"{self.source}: region {r.order} has a line box {ln.bbox} outside the "
                                     f"{w}x{h} image or empty")
            if r.kind not in KINDS:
                raise ValueError(f"{self.source}: region {r.order} kind {r.kind!r} not in {KINDS}")
            if not r.text.strip():
                raise ValueError(f"{self.source}: region {r.order} has empty text")
        return self

    def in_reading_order(self) -> list[Region]:
        return sorted(self.regions, key=lambda r: r.order)


def union_box(boxes) -> tuple[int, int, int, int]:
    boxes = list(boxes)
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def pad_box(box, pad: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Grow `box` by `pad` pixels on each side, clipped to the image `size` = (w, h)."""
    w, h = size
    return (max(0, box[0] - pad), max(0, box[1] - pad), min(w, box[2] + pad), min(h, box[3] + pad))


def split_lines(page: Page) -> Page:
    """One region per text line (regions without line info stay whole); kinds are inherited, order renumbered."""
    out = []
    for r in page.in_reading_order():
        parts = [Region(ln.text, ln.bbox, 0, r.kind, (ln,), r.cell) for ln in r.lines if ln.text.strip()] or [r]
        out.extend(parts)
    return replace(page, regions=[replace(r, order=i) for i, r in enumerate(out)])


def _key_int(seed: int, key: tuple) -> int:
    # blake2b of the repr: stable across processes and Python runs (unlike hash(), which is salted per process)
    digest = hashlib.blake2b(repr((int(seed),) + tuple(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rngs(seed: int, *key) -> tuple[random.Random, np.random.Generator]:
    """A (python, numpy) RNG pair that depends only on (seed, key)."""
    k = _key_int(seed, key)
    return random.Random(k), np.random.default_rng(k)
