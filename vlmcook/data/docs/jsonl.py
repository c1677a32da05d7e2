"""Pages from an image + boxes JSONL (for users who already have OCR'd or annotated scans).

One JSON object per line:
    {"image": "scans/p1.png",            # relative to the JSONL file's folder, or absolute
     "id": "p1",                          # optional; default "<file>:<line>"
     "regions": [{"text": "...", "bbox": [x1, y1, x2, y2],     # pixels, top-left origin, x2/y2 exclusive
                  "kind": "paragraph",    # optional, one of page.KINDS (default "paragraph")
                  "order": 0,             # optional reading order (default: list position)
                  "lines": [{"text": "...", "bbox": [...]}]}]}  # optional per-line boxes

Notable: a bad line (unreadable JSON or image, missing field, unknown kind, box outside the image by more than 1%
of its size) is skipped with a reason naming the file, line and region; boxes overshooting by less are clipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from PIL import Image

from vlmcook.data.docs.page import KINDS, Line, Page, Region


def _box(raw, size, what: str) -> tuple[int, int, int, int]:
    if not (isinstance(raw, (list, tuple)) and len(raw) == 4 and all(isinstance(v, (int, float)) for v in raw)):
        raise ValueError(f"{what}: bbox {raw!r} must be 4 numbers [x1, y1, x2, y2]")
    w, h = size
    x1, y1, x2, y2 = raw
    tol_x, tol_y = 0.01 * w, 0.01 * h
    if x1 < -tol_x or y1 < -tol_y or x2 > w + tol_x or y2 > h + tol_y or x2 <= x1 or y2 <= y1:
        raise ValueError(f"{what}: bbox {list(raw)} is empty or outside the {w}x{h} image")
    return (max(0, round(x1)), max(0, round(y1)), min(w, round(x2)), min(h, round(y2)))


def _region(raw: dict, i: int, size) -> Region:
    what = f"region {i}"
    if not isinstance(raw, dict) or not isinstance(raw.get("text"), str) or not raw["text"].strip():
        raise ValueError(f"{what}: needs a non-empty 'text' string")
    kind = raw.get("kind", "paragraph")
    if kind not in KINDS:
        raise ValueError(f"{what}: kind {kind!r} not in {KINDS}")
    lines = tuple(Line(str(ln.get("text", "")), _box(ln.get("bbox"), size, f"{what} line {k}"))
                  for k, ln in enumerate(raw.get("lines") or []))
    return Region(" ".join(raw["text"].split()), _box(raw.get("bbox"), size, what), int(raw.get("order", i)), kind,
                  lines)


def parse_line(text: str, base: Path, where: str) -> Page:
    rec = json.loads(text)
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
        raise ValueError("needs an 'image' path string")
    path = Path(rec["image"]) if Path(rec["image"]).is_absolute() else base / rec["image"]
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    regs = rec.get("regions")
    if not isinstance(regs, list) or not regs:
        raise ValueError("needs a non-empty 'regions' list")
    regions = [_region(r, i, img.size) for i, r in enumerate(regs)]
    return Page(img, regions, f"jsonl:{rec.get('id', where)}", {"image": str(path)}).validate()


def iter_jsonl(path: str | Path) -> Iterator[tuple[Page | None, tuple[str, str] | None]]:
    """Yield (page, None) per good line and (None, (where, why)) per skipped line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--jsonl {path}: no such file")
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is skipped by its number, not the whole file
        for n, raw in enumerate(f, 1):
            where = f"{path.name}:{n}"
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                if not text.strip():
                    continue
                yield parse_line(text, path.parent, where), None
            except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                yield None, (where, str(e))
