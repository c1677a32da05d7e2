"""Synthetic document pages rendered with Pillow, with exact text regions.

Notable:
- Layout: optional title, header and footer; one or two columns filled top to bottom with headings, paragraphs
  (left-aligned or justified), lists, tables (full grid / rules only / no lines) and figures (bar chart, line
  chart or shapes, drawn without any text so every visible glyph belongs to a region) with captions.
- Boxes are measured from what was drawn (`ImageDraw.textbbox` per word), padded by `pad` px so antialiasing and
  the later scan blur stay inside; layout keeps every gap between regions wider than two pads so boxes never
  overlap another region's glyphs.
- Reading order: header, title, then column by column top to bottom (table cells row-major), footer.
- Scan-like degradations (paper texture, illumination, blur, noise, JPEG) belong to the *clean* page; the
  corruption levels are applied later, per region (corrupt.py).
- Everything random comes from `rngs(seed, "synthetic", index)`: page `index` is the same in any process.
"""

from __future__ import annotations

import io
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlmcook.data.docs.page import Line, Page, Region, pad_box, rngs, union_box
from vlmcook.data.docs.text import TextSource

FONT_DIR = os.environ.get("VLMCOOK_FONT_DIR", "/usr/share/fonts")
# Latin text families from fonts-noto-core, fonts-liberation2, fonts-dejavu-core (other Noto files cover other
# scripts and would draw boxes for Latin letters).
_FONT_RE = re.compile(r"^(Noto(?:Sans|Serif)|Liberation(?:Sans|Serif|Mono)|DejaVu(?:Sans|Serif)(?:Mono|Condensed)?)"
                      r"(?:-(Regular|Bold|Italic|Oblique|BoldItalic|BoldOblique))?\.ttf$")


def find_fonts(root: str | Path = FONT_DIR) -> dict[str, dict[str, str]]:
    """{family: {"regular"|"bold"|"italic"|"bolditalic": path}} for the Latin families found under `root`."""
    fams: dict[str, dict[str, str]] = {}
    for p in sorted(Path(root).rglob("*.ttf")) if Path(root).is_dir() else []:
        m = _FONT_RE.match(p.name)
        if m:
            style = (m.group(2) or "Regular").lower().replace("oblique", "italic")
            fams.setdefault(m.group(1), {})[style] = str(p)
    fams = {f: s for f, s in fams.items() if "regular" in s}
    if not fams:
        raise FileNotFoundError(f"no usable Latin TrueType fonts under {root!r}: install the Debian packages "
                                "fonts-dejavu-core fonts-liberation2 fonts-noto-core, or set VLMCOOK_FONT_DIR")
    return fams


@lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@dataclass(frozen=True)
class SyntheticConfig:
    width: tuple[int, int] = (850, 1100)  # page width range, px
    aspect: tuple[float, float] = (1.25, 1.45)  # height / width
    body_size: tuple[int, int] = (17, 26)  # body font size range, px
    two_column_prob: float = 0.4
    # paragraph, heading, list, table, figure
    block_weights: tuple[float, float, float, float, float] = (0.5, 0.12, 0.14, 0.12, 0.12)
    title_prob: float = 0.7
    header_prob: float = 0.6
    footer_prob: float = 0.7
    dark_paper_prob: float = 0.0  # light text on dark background (slides-like); off by default
    scan_prob: float = 0.6  # chance of scan-like degradations on the clean page
    scan_blur: float = 0.7  # max Gaussian blur radius, px
    scan_noise: float = 6.0  # max Gaussian noise sigma, grey levels
    scan_jpeg: tuple[int, int] = (60, 95)  # JPEG quality range
    pad: int = 3  # box padding beyond the measured ink, px


# --- block layout: each builder lays out relative to (0, 0) and returns a _Block; placement adds the offset ---

@dataclass
class _Piece:  # one line of one region: words at x offsets, drawn with one font
    dx: int
    dy: int
    words: list[tuple[int, str]]
    font: ImageFont.FreeTypeFont
    region: int  # index into _Block.kinds


@dataclass
class _Block:
    height: int
    pieces: list[_Piece]
    kinds: list[tuple[str, tuple | None]]  # per region: (kind, cell)
    shapes: list  # callables (draw, x, y) drawing non-text graphics


def _wrap(words: list[str], font, width: int) -> list[list[str]]:
    lines, cur = [], []
    for w in words:
        if cur and font.getlength(" ".join(cur + [w])) > width:
            lines.append(cur)
            cur = []
        cur.append(w)
    return lines + ([cur] if cur else [])


def _line_words(words: list[str], font, width: int, justify: bool) -> list[tuple[int, str]]:
    if not justify or len(words) < 2:
        return [(0, " ".join(words))]
    gap = (width - sum(font.getlength(w) for w in words)) / (len(words) - 1)
    out, x = [], 0.0
    for w in words:
        out.append((round(x), w))
        x += font.getlength(w) + gap
    return out


def _text_block(text: str, font, width: int, lead: float, kind: str, justify=False, center=False) -> _Block:
    lines = _wrap(text.split(), font, width)
    step = round(font.size * lead)
    pieces = []
    for i, ws in enumerate(lines):
        last = i == len(lines) - 1
        words = _line_words(ws, font, width, justify and not last)
        dx = round((width - font.getlength(" ".join(ws))) / 2) if center else 0
        pieces.append(_Piece(dx, i * step, words, font, 0))
    return _Block(len(lines) * step, pieces, [(kind, None)], [])


def _list_block(items: list[str], marker: str, font, width: int, lead: float) -> _Block:
    hang = round(font.getlength("00. "))
    step, pieces, kinds, y = round(font.size * lead), [], [], 0
    for k, item in enumerate(items):
        mark = {"num": f"{k + 1}.", "alpha": f"{'abcdefghij'[k % 10]})"}.get(marker, marker)
        for i, ws in enumerate(_wrap(item.split(), font, width - hang)):
            words = ([(0, mark)] if i == 0 else []) + [(hang, " ".join(ws))]
            pieces.append(_Piece(0, y, words, font, k))
            y += step
        kinds.append(("list", None))
        y += round(font.size * 0.5)  # item gap > 2 pads keeps item boxes apart
    return _Block(y, pieces, kinds, [])


def _table_block(cells: list[list[str]], font, bold, width: int, style: str, table_id: int) -> _Block | None:
    cols, cellpad = len(cells[0]), max(8, font.size // 2)
    colw = [max(font.getlength(r[c]) for r in cells) + 2 * cellpad for c in range(cols)]
    if sum(colw) > width:
        return None
    colw = [w + (width - sum(colw)) / cols for w in colw] if style == "grid" else colw
    rowh = round(font.size * 1.9)
    xs = [0] + np.cumsum(colw).round().astype(int).tolist()
    pieces, kinds = [], []
    for r, row in enumerate(cells):
        for c, s in enumerate(row):
            pieces.append(_Piece(xs[c] + cellpad, r * rowh + round(font.size * 0.4), [(0, s)],
                                 bold if r == 0 else font, len(kinds)))
            kinds.append(("table_cell", (table_id, r, c)))
    shapes = [lambda d, x, y, xs=xs, rowh=rowh, n=len(cells): _table_lines(d, x, y, xs, rowh, n, style)]
    return _Block(len(cells) * rowh, pieces, kinds, shapes)


def _table_lines(draw, x, y, xs, rowh, nrows, style):
    if style == "none":
        return
    rows = range(nrows + 1) if style == "grid" else (0, 1, nrows)
    for r in rows:
        draw.line([(x, y + r * rowh), (x + xs[-1], y + r * rowh)], fill=(60, 60, 60), width=1)
    if style == "grid":
        for cx in xs:
            draw.line([(x + cx, y), (x + cx, y + nrows * rowh)], fill=(60, 60, 60), width=1)


def _figure(rng: random.Random, w: int, h: int):
    """A text-free figure: bar chart, line chart or shapes. Returns a callable (draw, x, y)."""
    kind, n = rng.choice(["bars", "line", "shapes"]), rng.randint(4, 9)
    vals = [rng.uniform(0.15, 0.95) for _ in range(n)]
    col = tuple(rng.randint(30, 200) for _ in range(3))

    def draw_fig(d: ImageDraw.ImageDraw, x: int, y: int):
        d.rectangle([x, y, x + w - 1, y + h - 1], outline=(90, 90, 90))
        x0, y0, x1, y1 = x + w * 0.1, y + h * 0.08, x + w * 0.95, y + h * 0.9
        d.line([(x0, y1), (x1, y1)], fill=(40, 40, 40), width=2)
        d.line([(x0, y0), (x0, y1)], fill=(40, 40, 40), width=2)
        step = (x1 - x0) / n
        pts = [(x0 + step * (i + 0.5), y1 - v * (y1 - y0)) for i, v in enumerate(vals)]
        if kind == "bars":
            for px, py in pts:
                d.rectangle([px - step * 0.3, py, px + step * 0.3, y1 - 1], fill=col)
        elif kind == "line":
            d.line(pts, fill=col, width=3)
            for px, py in pts:
                d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=col)
        else:
            for px, py in pts:
                r = step * 0.35
                d.ellipse([px - r, py - r, px + r, py + r], outline=col, width=3)
    return draw_fig


# --- page assembly ---

@dataclass
class _Style:
    body: str  # font paths
    bold: str
    italic: str
    size: int
    lead: float
    ink: tuple[int, int, int]
    justify: bool


def _pick_style(rng: random.Random, cfg: SyntheticConfig, fonts: dict) -> _Style:
    fam = fonts[rng.choice(sorted(fonts))]
    ink = tuple(rng.randint(0, 70) for _ in range(3)) if rng.random() < 0.3 else (rng.randint(0, 40),) * 3
    return _Style(fam["regular"], fam.get("bold", fam["regular"]), fam.get("italic", fam["regular"]),
                  rng.randint(*cfg.body_size), rng.uniform(1.25, 1.5), ink, rng.random() < 0.4)


def _next_block(rng, cfg, st: _Style, text: TextSource, width: int, counters: dict) -> _Block | None:
    body = _font(st.body, st.size)
    kind = rng.choices(["para", "heading", "list", "table", "figure"], weights=cfg.block_weights)[0]
    if kind == "heading":
        return _text_block(text.heading(rng), _font(st.bold, round(st.size * rng.uniform(1.15, 1.4))), width,
                           1.3, "title")
    if kind == "list":
        items = [text.sentence(rng, rng.randint(4, 14)) for _ in range(rng.randint(2, 5))]
        return _list_block(items, rng.choice(["-", "*", "num", "alpha"]), body, width, st.lead)
    if kind == "table":
        counters["table"] += 1
        small = round(st.size * 0.9)
        cells = text.table(rng, rng.randint(3, 6), rng.randint(2, 4))
        return _table_block(cells, _font(st.body, small), _font(st.bold, small), width,
                            rng.choice(["grid", "rules", "none"]), counters["table"])
    if kind == "figure":
        counters["figure"] += 1
        fw, fh = width, round(width * rng.uniform(0.35, 0.6))
        cap = _text_block(f"Figure {counters['figure']}: {text.sentence(rng, 12)}.",
                          _font(st.italic, round(st.size * 0.9)), width, 1.3, "caption", center=True)
        gap = round(st.size * 0.8)
        for p in cap.pieces:
            p.dy += fh + gap
        return _Block(fh + gap + cap.height, cap.pieces, cap.kinds, [_figure(rng, fw, fh)])
    return _text_block(text.paragraph(rng), body, width, st.lead, "paragraph", justify=st.justify)


def _paper(rng: np.random.Generator, w: int, h: int, dark: bool) -> np.ndarray:
    """Paper colour plus low-frequency texture, float [H, W, 3]."""
    base = rng.uniform(20, 50, 3) if dark else rng.uniform(225, 255, 3) - rng.uniform(0, 12, 3) * (rng.random() < 0.5)
    low = rng.normal(0, 1, (8, 8)).astype(np.float32)
    tex = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR)) * rng.uniform(0, 4)
    return np.clip(base.astype(np.float32)[None, None] + tex[..., None], 0, 255)


def _draw_block(draw, blk: _Block, x: int, y: int, fill, regions: list, pad: int, size) -> None:
    for shape in blk.shapes:
        shape(draw, x, y)
    per_region: dict[int, list] = {}
    for p in blk.pieces:
        boxes = []
        for wx, word in p.words:
            pos = (x + p.dx + wx, y + p.dy)
            draw.text(pos, word, font=p.font, fill=fill)
            boxes.append(draw.textbbox(pos, word, font=p.font))
        per_region.setdefault(p.region, []).append(Line(" ".join(w for _, w in p.words), union_box(boxes)))
    for k, lines in sorted(per_region.items()):
        kind, cell = blk.kinds[k]
        lines = tuple(Line(ln.text, pad_box(ln.bbox, pad, size)) for ln in lines)
        text = " ".join(ln.text for ln in lines)
        regions.append(Region(text, union_box(ln.bbox for ln in lines), len(regions), kind, lines, cell))


def _layout(rng, cfg, st, text, draw, size, fill) -> list[Region]:
    w, h = size
    margin = round(w * rng.uniform(0.06, 0.1))
    top, bottom, regions, counters = margin, h - margin, [], {"table": 0, "figure": 0}
    small = _font(st.body, max(12, round(st.size * 0.75)))
    if rng.random() < cfg.header_prob:
        hdr = _text_block(text.title(rng), small, w - 2 * margin, 1.2, "header")
        _draw_block(draw, hdr, margin, round(margin * 0.5), fill, regions, cfg.pad, size)
        top = round(margin * 0.5) + hdr.height + st.size
    footer = None
    if rng.random() < cfg.footer_prob:
        footer = _text_block(rng.choice(["Page {}", "- {} -", "{}"]).format(rng.randint(1, 400)), small,
                             w - 2 * margin, 1.2, "footer", center=True)
        bottom = h - margin - footer.height
    if rng.random() < cfg.title_prob:
        blk = _text_block(text.title(rng), _font(st.bold, round(st.size * rng.uniform(1.5, 2.1))), w - 2 * margin,
                          1.25, "title", center=rng.random() < 0.5)
        if blk.height <= bottom - top:  # a title that would run off a small page is left out, never clipped
            _draw_block(draw, blk, margin, top, fill, regions, cfg.pad, size)
            top += blk.height + st.size
    ncol = 2 if rng.random() < cfg.two_column_prob else 1
    gutter = round(st.size * 1.5)
    colw = (w - 2 * margin - gutter * (ncol - 1)) // ncol
    col, y, fails = 0, top, 0
    while col < ncol and fails < 8:
        blk = _next_block(rng, cfg, st, text, colw, counters)
        if blk is None or blk.height > bottom - top:
            fails += 1
            continue
        if y + blk.height > bottom:
            col, y = col + 1, top
            continue
        _draw_block(draw, blk, margin + col * (colw + gutter), y, fill, regions, cfg.pad, size)
        y += blk.height + round(st.size * rng.uniform(0.8, 1.4))
    if footer is not None:
        _draw_block(draw, footer, margin, bottom + st.size // 2, fill, regions, cfg.pad, size)
    return regions


def soft_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 3-tap blur [k, 1-2k, k] on float [H, W, C], k matched to a Gaussian of `sigma` <= ~0.8 px.

    10x faster than PIL's GaussianBlur on a full page, and at these radii indistinguishable from it."""
    k = np.float32(min(0.25, sigma * sigma / 2))  # variance of the 3-tap kernel is 2k
    if k <= 0.005:
        return a
    for axis in (0, 1):
        lo, hi = np.roll(a, 1, axis), np.roll(a, -1, axis)
        a = (1 - 2 * k) * a + k * (lo + hi)
    return a


def scan_degrade(img: Image.Image, rng: np.random.Generator, cfg: SyntheticConfig) -> Image.Image:
    """Page-level scan look: illumination gradient, blur, grain, JPEG. Mild: the page must stay fully legible."""
    a = np.array(img, dtype=np.float32)
    h, w = a.shape[:2]
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :] * rng.uniform(-1, 1)
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * rng.uniform(-1, 1)
    a *= (1 - rng.uniform(0, 0.08) * (gx + gy + 1) / 2)[..., None]  # uneven illumination
    a = soft_blur(a, rng.uniform(0, cfg.scan_blur))
    a += rng.standard_normal(a.shape, dtype=np.float32) * rng.uniform(0, cfg.scan_noise)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(*cfg.scan_jpeg)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def render_page(index: int, seed: int, cfg: SyntheticConfig = SyntheticConfig(), text: TextSource | None = None,
                fonts: dict | None = None) -> Page:
    """Synthetic page number `index` of the stream defined by `seed`."""
    rng, nrng = rngs(seed, "synthetic", index)
    fonts = fonts or find_fonts()
    text = text or TextSource.builtin()
    w = rng.randint(*cfg.width)
    size = (w, round(w * rng.uniform(*cfg.aspect)))
    dark = rng.random() < cfg.dark_paper_prob
    st = _pick_style(rng, cfg, fonts)
    fill = tuple(255 - c for c in st.ink) if dark else st.ink
    img = Image.fromarray(_paper(nrng, *size, dark).astype(np.uint8))
    regions = _layout(rng, cfg, st, text, ImageDraw.Draw(img), size, fill)
    scanned = rng.random() < cfg.scan_prob
    if scanned:
        img = scan_degrade(img, nrng, cfg)
    meta = {"font": Path(st.body).stem, "body_size": st.size, "scanned": scanned, "ink": list(fill)}
    return Page(img, regions, f"synthetic:{index}", meta).validate()
