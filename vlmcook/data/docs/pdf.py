"""Real PDF pages via pypdfium2: render each page, take text and character boxes from its text layer.

Notable:
- Characters are read in content order (`FPDFText_GetUnicode` + tight `get_charbox`, PDF points, origin bottom
  left) and grouped into lines (same baseline band, no backward jump, no gap > 2 line heights), then lines into
  blocks (next line starts < 0.8 line height below, overlaps horizontally, similar height). Block text = its lines
  joined by a space (no space after a line-final hyphen). Reading order = content order of the blocks.
- Kinds are guessed from geometry: a block in the top / bottom 7% of the page is a header / footer, a block whose
  line height is > 1.3x the page median is a title, the rest are paragraphs.
- Chars with unmappable unicode or rotated text are dropped with their line, so no target holds text the
  image does not show; a region whose rendered box holds no ink (white or invisible text) is dropped too.
- Bad input never raises: encrypted, corrupt or empty files and pages that are rotated, have no text layer, only
  whitespace or no visible text are skipped with a reason (`PdfResult.skipped`).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from vlmcook.data.docs.page import Line, Page, Region, pad_box, union_box


@dataclass(frozen=True)
class PdfConfig:
    dpi: float = 144.0
    max_side: int = 2048  # cap on the rendered page's longer side, px
    pad: int = 2  # box padding beyond the glyph boxes, px
    min_ink: float = 0.002  # a region needs this fraction of ink-like pixels, else its text is not visible

    def __post_init__(self):
        # a dpi of 0 or NaN would render nothing and skip every page with a misleading reason
        if not (isinstance(self.dpi, (int, float)) and 0 < self.dpi < math.inf):
            raise ValueError(f"dpi must be a number > 0, got {self.dpi!r}")
        if isinstance(self.max_side, bool) or not isinstance(self.max_side, int) or self.max_side < 1:
            raise ValueError(f"max_side must be an int >= 1, got {self.max_side!r}")
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {self.pad!r}")
        if not 0 <= self.min_ink <= 1:
            raise ValueError(f"min_ink must be in [0, 1], got {self.min_ink!r}")


@dataclass
class PdfResult:
    pages: list[Page] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)


@dataclass
class _Char:
    ch: str
    box: tuple[float, float, float, float] | None  # x1, y1, x2, y2 in pixels (top-left origin), None for spaces
    size: float = 0.0  # height of the loose (font) box, px: a line-height measure independent of the glyphs


def _chars(textpage, page_box, scale: float) -> list[_Char]:
    left, _, _, top = page_box
    out = []
    for i in range(textpage.count_chars()):
        code = pdfium_c.FPDFText_GetUnicode(textpage.raw, i)
        # NFKC: ligatures (U+FB01 "fi") and compatibility forms become the letters a reader sees
        ch = unicodedata.normalize("NFKC", chr(code)) if 0 < code < 0x110000 else "\ufffd"
        if pdfium_c.FPDFText_HasUnicodeMapError(textpage.raw, i) or abs(pdfium_c.FPDFText_GetCharAngle(
                textpage.raw, i)) > 0.01 and ch.strip():
            ch = "\ufffd"
        if ch and ch in "\r\n":
            out.append(_Char("\n", None))
            continue
        if not ch.strip() or not ch.isprintable():
            out.append(_Char(" ", None))
            continue
        x1, y1, x2, y2 = textpage.get_charbox(i)  # tight glyph box: left, bottom, right, top in points
        box = ((x1 - left) * scale, (top - y2) * scale, (x2 - left) * scale, (top - y1) * scale)
        _, lb, _, lt = textpage.get_charbox(i, loose=True)
        out.append(_Char(ch, box if box[2] > box[0] and box[3] > box[1] else None, (lt - lb) * scale))
    return out


def _lines(chars: list[_Char]) -> list[tuple[str, tuple, float]]:
    """Group chars into (text, float box, font height) lines."""
    lines, cur, boxes, sizes, space = [], "", [], [], False

    def flush():
        nonlocal cur, boxes, sizes
        if cur.strip() and boxes:
            lines.append((cur.strip(), union_box(boxes), float(np.median(sizes))))
        cur, boxes, sizes = "", [], []

    for c in chars:
        if c.ch == "\n":
            flush()
            continue
        if c.box is None:
            space = space or c.ch == " "
            if c.ch != " ":  # a printable char without a box: cannot place it, end the line here
                flush()
            continue
        if boxes:
            lb, h = union_box(boxes), max(sizes)
            cy = (c.box[1] + c.box[3]) / 2
            if not (lb[1] - 0.2 * h <= cy <= lb[3] + 0.2 * h) or c.box[0] < boxes[-1][0] - 0.5 * h \
                    or c.box[0] - boxes[-1][2] > 2 * h:
                flush()
            elif space or c.box[0] - boxes[-1][2] > 0.2 * h:
                cur += " "
        cur += c.ch
        boxes.append(c.box)
        sizes.append(c.size or (c.box[3] - c.box[1]))
        space = False
    flush()
    return [ln for ln in lines if "\ufffd" not in ln[0]]


def _blocks(lines: list[tuple[str, tuple, float]]) -> list[list[tuple[str, tuple, float]]]:
    blocks: list[list] = []
    for t, b, h in lines:
        if blocks:
            _, pb, ph = blocks[-1][-1]
            below = -0.3 * ph <= b[1] - pb[3] < 0.8 * ph  # tight boxes: the gap is leading + ascender room
            overlap = b[0] < pb[2] and pb[0] < b[2]
            if below and overlap and 0.7 < h / ph < 1.4:
                blocks[-1].append((t, b, h))
                continue
        blocks.append([(t, b, h)])
    return blocks


def _join(texts: list[str]) -> str:
    out = texts[0]
    for t in texts[1:]:
        out += t if out.endswith("-") else " " + t
    return out


def _kind(box, line_h: float, median_h: float, height: int) -> str:
    if line_h > 1.3 * median_h:
        return "title"
    if box[3] < 0.07 * height:
        return "header"
    return "footer" if box[1] > 0.93 * height else "paragraph"


def _has_ink(a: np.ndarray, box, min_ink: float) -> bool:
    x1, y1, x2, y2 = box
    crop = a[y1:y2, x1:x2].astype(np.int16)
    return bool(np.mean(np.abs(crop - np.median(crop)) > 60) >= min_ink)


def _regions(blocks, size, grey: np.ndarray, cfg: PdfConfig) -> list[Region]:
    median_h = float(np.median([h for blk in blocks for _, _, h in blk]))
    regions = []
    for blk in blocks:
        lines = tuple(Line(t, pad_box(tuple(round(v) for v in b), cfg.pad, size)) for t, b, _ in blk)
        lines = tuple(ln for ln in lines if ln.bbox[2] > ln.bbox[0] and ln.bbox[3] > ln.bbox[1])
        if not lines:
            continue
        box = union_box(ln.bbox for ln in lines)
        if not _has_ink(grey, box, cfg.min_ink):
            continue
        line_h = float(np.median([h for _, _, h in blk]))
        regions.append(Region(_join([ln.text for ln in lines]), box, len(regions),
                              _kind(box, line_h, median_h, size[1]), lines))
    return regions


def read_page(doc, index: int, name: str, cfg: PdfConfig) -> tuple[Page | None, str | None]:
    """(page, None) or (None, reason it was skipped)."""
    page = doc[index]
    if page.get_rotation() % 360:
        return None, f"rotated {page.get_rotation()} degrees (not supported)"
    textpage = page.get_textpage()
    if textpage.count_chars() == 0:
        return None, "no text layer"
    box = page.get_bbox()  # effective crop box (get_cropbox misses boxes inherited from the page tree)
    w_pt, h_pt = box[2] - box[0], box[3] - box[1]
    scale = min(cfg.dpi / 72, cfg.max_side / max(w_pt, h_pt))
    chars = _chars(textpage, box, scale)
    if not any(c.box for c in chars):
        return None, "text layer holds only whitespace"
    img = page.render(scale=scale).to_pil().convert("RGB")
    # a line partly off the rendered page would put unseen characters in the target: drop it
    W, H = img.size
    lines = [(t, b, h) for t, b, h in _lines(chars) if b[0] >= -1 and b[1] >= -1 and b[2] <= W + 1 and b[3] <= H + 1]
    grey = np.asarray(img.convert("L"))
    regions = _regions(_blocks(lines), img.size, grey, cfg) if lines else []
    if not regions:
        return None, "no visible text (text boxes are blank in the render, off-page or unmappable)"
    return Page(img, regions, f"pdf:{name}#{index + 1}", {"scale": scale}).validate(), None


def iter_pdf(path: str | Path, cfg: PdfConfig = PdfConfig(), name: str | None = None
             ) -> Iterator[tuple[Page | None, tuple[str, str] | None]]:
    """Yield (page, None) per usable page and (None, (where, why)) per skipped file or page; never raises on bad
    files. Pages are rendered one at a time, so a long PDF never sits in memory. `name` (default: the file name)
    goes into `Page.source`, which keys the page's randomness: pass the path relative to the input folder."""
    return iter_pages(path, read_page, cfg, name)


def iter_pages(path: str | Path, read, cfg: PdfConfig = PdfConfig(), name: str | None = None) -> Iterator:
    """`read(doc, index, name, cfg) -> (item | None, why)` on every page of one PDF: (item, None) per usable page,
    (None, (where, why)) per skipped file or page; never raises on bad files."""
    path = Path(path)
    name = name or path.name
    try:
        doc = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        why = "encrypted (password required)" if "password" in str(e).lower() else f"cannot open: {e}"
        yield None, (str(path), why)
        return
    try:
        if len(doc) == 0:
            yield None, (str(path), "empty PDF (no pages)")
        for i in range(len(doc)):
            try:
                item, why = read(doc, i, name, cfg)
            except (pdfium.PdfiumError, ValueError) as e:  # a broken page must not end the file
                item, why = None, f"unreadable page: {e}"
            yield (item, None) if item is not None else (None, (f"{path}#{i + 1}", why))
    finally:
        doc.close()


def read_pdf(path: str | Path, cfg: PdfConfig = PdfConfig()) -> PdfResult:
    res = PdfResult()
    for page, skip in iter_pdf(path, cfg):
        res.pages.append(page) if page is not None else res.skipped.append(skip)
    return res


def find_pdfs(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--pdf {folder}: not a directory")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".pdf" and p.is_file())
