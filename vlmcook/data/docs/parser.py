"""The parser baseline (the paradigm unified learning replaces): PDF pages -> interleaved text + figure crops.

Notable:
- Text is pypdfium2's extraction in pdfium's own order (the content-stream order: pdfium does no column analysis),
  whitespace collapsed (its line breaks are layout, as page.py unwraps region text). Its layout errors (columns
  read across, a caption inside the paragraph next to it) are the parser's real ones, not injected.
- Figures are the page's image objects (nested in forms too) at least `min_figure` px on each side, cropped from the
  page render and placed where the object sits in the content stream: before the first character drawn after it.
- Record: the SFT format of samples.py, `{"id", "images", "messages", "meta"}`; the user asks `PROMPT`, the
  assistant turn is the document (text runs and `(<image>./</image>)` markers, one per crop, a newline between
  parts); image tokens carry no loss (processor.py), so only the text is learned, as in interleaved pre-training.
- Bad input never raises: unopenable / encrypted files and pages without a text layer (image-only scans) or with
  only whitespace are skipped with a reason, as pdf.py does; `run` lists them in summary.json.
"""

from __future__ import annotations

import ctypes
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

from vlmcook.data.docs.pdf import PdfConfig, find_pdfs, iter_pages
from vlmcook.data.image import IMAGE_MARKER

PROMPT = "Read the document."


@dataclass
class Parsed:
    source: str  # "pdf:<name>#<page>"
    parts: list = field(default_factory=list)  # str text runs and PIL figure crops, in the parser's order
    size: tuple[int, int] = (0, 0)  # rendered page (w, h), px

    @property
    def text(self) -> str:
        return " ".join(p for p in self.parts if isinstance(p, str))

    @property
    def figures(self) -> list[Image.Image]:
        return [p for p in self.parts if not isinstance(p, str)]


def _addr(handle) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def parse_page(doc, index: int, name: str, cfg: PdfConfig = PdfConfig(), min_figure: int = 8
               ) -> tuple[Parsed | None, str | None]:
    """(parsed page, None) or (None, why it was skipped)."""
    import pypdfium2.raw as pdfium_c

    page = doc[index]
    textpage = page.get_textpage()
    n = textpage.count_chars()
    if n == 0:
        return None, "no text layer"
    text = textpage.get_text_range()
    if not text.strip():
        return None, "text layer holds only whitespace"
    objects = list(page.get_objects(max_depth=8))  # depth-first, in content-stream order
    position = {_addr(o.raw): k for k, o in enumerate(objects)}
    # stream position of each char's text object; pdfium's generated spaces / line breaks take their predecessor's
    where, last = [], -1
    for i in range(n):
        last = position.get(_addr(pdfium_c.FPDFText_GetTextObject(textpage.raw, i)), last)
        where.append(last)
    left, bottom, right, top = page.get_bbox()
    scale = min(cfg.dpi / 72, cfg.max_side / max(right - left, top - bottom))
    render = page.render(scale=scale).to_pil().convert("RGB")
    cuts = []  # (char index the figure goes before, crop)
    for k, o in enumerate(objects):
        if o.type != pdfium_c.FPDF_PAGEOBJ_IMAGE:
            continue
        x1, y1, x2, y2 = o.get_bounds()  # PDF points, origin bottom left
        box = tuple(round(v) for v in ((x1 - left) * scale, (top - y2) * scale, (x2 - left) * scale,
                                       (top - y1) * scale))
        box = (max(0, box[0]), max(0, box[1]), min(render.width, box[2]), min(render.height, box[3]))
        if box[2] - box[0] >= min_figure and box[3] - box[1] >= min_figure:
            cuts.append((next((i for i, w in enumerate(where) if w > k), n), render.crop(box)))
    parts, start = [], 0
    for at, crop in sorted(cuts, key=lambda c: c[0]):
        parts += [" ".join(textpage.get_text_range(start, at - start).split()), crop]
        start = at
    parts.append(" ".join(textpage.get_text_range(start, n - start).split()))
    return Parsed(f"pdf:{name}#{index + 1}", [p for p in parts if not isinstance(p, str) or p], render.size), None


def iter_parsed(path: str | Path, cfg: PdfConfig = PdfConfig(), name: str | None = None
                ) -> Iterator[tuple[Parsed | None, tuple[str, str] | None]]:
    """(parsed, None) per usable page and (None, (where, why)) per skipped file or page; never raises on bad files."""
    return iter_pages(path, parse_page, cfg, name)


def record(parsed: Parsed, image_paths: list[str]) -> dict:
    """The SFT record of a parsed page; `image_paths` name its figure crops in order."""
    body = "\n".join(IMAGE_MARKER if not isinstance(p, str) else p for p in parsed.parts)
    return {"id": parsed.source, "images": list(image_paths),
            "messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": body}],
            "meta": {"source": parsed.source, "mode": "parser", "size": list(parsed.size),
                     "figures": len(image_paths), "text": parsed.text}}


def run(pdf_dir: str | Path, out: str | Path, cfg: PdfConfig = PdfConfig()) -> dict:
    """Parse every PDF under `pdf_dir` into `out/samples.jsonl` + `out/images/` + `out/summary.json`."""
    pdf_dir, out, t0 = Path(pdf_dir), Path(out), time.time()
    (out / "images").mkdir(parents=True, exist_ok=True)
    pages, figures, skipped = 0, 0, []
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for j, path in enumerate(find_pdfs(pdf_dir)):
            for k, (parsed, skip) in enumerate(iter_parsed(path, cfg, path.relative_to(pdf_dir).as_posix())):
                if parsed is None:
                    skipped.append({"where": skip[0], "why": skip[1]})
                    continue
                rels = [f"images/{j:06d}_{k:04d}_{m:02d}.png" for m in range(len(parsed.figures))]
                for rel, crop in zip(rels, parsed.figures):
                    crop.save(out / rel, "PNG", compress_level=1)
                f.write(json.dumps(record(parsed, rels), ensure_ascii=False) + "\n")
                pages, figures = pages + 1, figures + len(rels)
    secs = time.time() - t0
    summary = {"mode": "parser", "pages": pages, "figures": figures, "seconds": round(secs, 2),
               "pages_per_second": round(pages / max(secs, 1e-9), 2), "skipped": skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
