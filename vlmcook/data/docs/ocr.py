"""An independent legibility meter: tesseract's character error rate on a region crop.

Notable:
- Used by the tests and the benchmark to check that boxes hold their text and that the corruption levels mean
  what they say; the data pipeline itself never needs tesseract (import is lazy).
- The crop is upscaled so the text line is ~40 px tall (tesseract reads best at x-height ~20 px), converted to
  greyscale and framed by a paper-coloured border; page segmentation mode 6 (one uniform block of text).
- CER = Levenshtein distance / reference length, on whitespace-collapsed text, capped at 1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from vlmcook.data.docs.corrupt import text_height
from vlmcook.data.docs.page import Region
from vlmcook.eval.metrics import edit_distance


def normalise(s: str) -> str:
    return " ".join(s.split())


def cer(ref: str, hyp: str) -> float:
    ref, hyp = normalise(ref), normalise(hyp)
    return min(1.0, edit_distance(ref, hyp) / max(1, len(ref)))


def _words(s: str) -> list[str]:
    return [w for w in ("".join(c for c in t.lower() if c.isalnum()) for t in s.split()) if w]


def word_recall(ref: str, hyp: str) -> float:
    """Share of the reference's words (lower-cased, punctuation stripped) found in the reading, with multiplicity.
    Unlike CER it does not reward garbage output for chance character matches."""
    want, got = _words(ref), _words(hyp)
    pool, hit = {}, 0
    for w in got:
        pool[w] = pool.get(w, 0) + 1
    for w in want:
        if pool.get(w, 0) > 0:
            pool[w] -= 1
            hit += 1
    return hit / max(1, len(want))


def read_region(image: Image.Image, r: Region, target_height: float = 40.0) -> str:
    import pytesseract  # optional dependency (extra "docs")

    crop = image.crop(r.bbox).convert("L")
    scale = max(1.0, target_height / max(1.0, text_height(r)))
    if scale > 1.01:
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.BICUBIC)
    paper = int(np.median(np.asarray(crop)))
    crop = ImageOps.expand(crop, border=20, fill=paper)
    psm = 7 if len(r.lines) == 1 else 6  # 7 = single text line: reads short cells that mode 6 drops
    return pytesseract.image_to_string(crop, config=f"--psm {psm}")


def region_cer(image: Image.Image, r: Region) -> float:
    return cer(r.text, read_region(image, r))


def region_cers(pairs, workers: int = 2) -> list[float]:
    """CER for many (image, region) pairs, `workers` tesseract processes at a time (each limited to one thread:
    tesseract's own OpenMP threads only add overhead on small crops)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    with ThreadPoolExecutor(max(1, workers)) as ex:
        return list(ex.map(lambda pr: region_cer(*pr), pairs))
