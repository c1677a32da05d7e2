"""Corruption levels: what they touch, determinism, and legibility measured by tesseract."""

import shutil

import numpy as np
import pytest

from vlmcook.data.docs.corrupt import CorruptConfig, choose_regions, corrupt_page
from vlmcook.data.docs.page import Page, Region, rngs
from vlmcook.data.docs.synthetic import SyntheticConfig, render_page

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract not installed")
TEXT_ONLY = SyntheticConfig(block_weights=(0.6, 0.2, 0.2, 0.0, 0.0))


@pytest.fixture(scope="module")
def pages():
    return [render_page(i, 5, TEXT_ONLY) for i in range(3)]


def _grey(img):
    return np.asarray(img.convert("L"), dtype=np.int16)


def test_high_leaves_no_glyph_pixel(pages):
    cfg = CorruptConfig(weights=(0, 0, 1), region_fraction=1.0)
    for page in pages:
        cor = corrupt_page(page, 0, cfg)
        assert set(cor.levels.values()) == {"high"} and len(cor.levels) == len(page.regions)
        before, after = _grey(page.image), _grey(cor.image)
        for r in page.regions:
            x1, y1, x2, y2 = r.bbox
            b, a = before[y1:y2, x1:x2], after[y1:y2, x1:x2]
            # ink is >= 140 grey levels darker than the paper (ink <= 70, paper >= 213); a glyph pixel, even an
            # antialiased or blurred one, is > 60 darker than the box's own median
            assert (b < np.median(b) - 60).sum() > 0  # there was ink
            assert (np.abs(a - np.median(a)) > 60).sum() == 0, f"glyph pixels survive in {r.bbox}"
            assert abs(np.median(a) - np.median(b)) < 25  # filled with the paper, not a visible block


def test_corruption_stays_inside_the_chosen_boxes(pages):
    page = pages[0]
    cor = corrupt_page(page, 1, CorruptConfig(region_fraction=0.5))
    inside = np.zeros(_grey(page.image).shape, bool)
    for r in page.regions:
        if r.order in cor.levels:
            x1, y1, x2, y2 = r.bbox
            inside[y1:y2, x1:x2] = True
    diff = np.abs(np.asarray(cor.image, np.int16) - np.asarray(page.image, np.int16)).max(-1)
    assert diff[inside].max() > 0 and diff[~inside].max() == 0
    assert len(cor.levels) == max(1, round(0.5 * len(page.regions)))


def test_same_seed_same_corruption_other_seed_differs(pages):
    page = pages[1]
    a, b, c = corrupt_page(page, 3), corrupt_page(page, 3), corrupt_page(page, 4)
    assert a.levels == b.levels and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.levels != c.levels or not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    # the same regions at the same levels but another seed still get different noise
    d = corrupt_page(page, 3, CorruptConfig(weights=(0, 1, 0), region_fraction=1.0))
    e = corrupt_page(page, 4, CorruptConfig(weights=(0, 1, 0), region_fraction=1.0))
    assert not np.array_equal(np.asarray(d.image), np.asarray(e.image))


def test_level_weights_and_bad_configs():
    page = render_page(0, 1)
    for i, lv in enumerate(("low", "medium", "high")):
        w = [0.0, 0.0, 0.0]
        w[i] = 1.0
        assert set(corrupt_page(page, 0, CorruptConfig(weights=tuple(w))).levels.values()) == {lv}
    only = corrupt_page(page, 0, CorruptConfig(levels=("medium",), weights=(1.0,), region_fraction=1.0))
    assert set(only.levels.values()) == {"medium"}
    with pytest.raises(ValueError, match="each must be one of"):
        CorruptConfig(levels=("low", "extreme"), weights=(1, 1))
    with pytest.raises(ValueError, match="one per level"):
        CorruptConfig(weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="region_fraction"):
        CorruptConfig(region_fraction=0)


def test_overlapping_regions_are_never_corrupted(pages):
    img = pages[0].image
    regs = [Region("a", (10, 10, 100, 40), 0, "paragraph"), Region("b", (90, 30, 200, 60), 1, "paragraph"),
            Region("c", (10, 100, 100, 130), 2, "paragraph")]
    page = Page(img, regs, "t").validate()
    for s in range(5):
        assert set(choose_regions(page, CorruptConfig(region_fraction=1.0), rngs(s, "x")[0])) == {2}


def _levels_cer(pages, n: int, clean: bool):
    """Tesseract CER per level on the same n regions: (clean,) then corrupted at each level."""
    from vlmcook.data.docs.ocr import region_cers

    regs = [(p, r) for p in pages for r in p.regions if 15 <= len(r.text) <= 120][:n]
    jobs = {"clean": [(p.image, r) for p, r in regs]} if clean else {}
    for lv in ("low", "medium", "high"):
        cfg = CorruptConfig(levels=(lv,), weights=(1.0,), region_fraction=1.0)
        cors = {p.source: corrupt_page(p, 0, cfg) for p in pages}
        jobs[lv] = [(cors[p.source].image, r) for p, r in regs]
    flat = region_cers([j for v in jobs.values() for j in v])
    return {k: float(np.mean(flat[i * len(regs):(i + 1) * len(regs)])) for i, k in enumerate(jobs)}


@needs_tesseract
def test_levels_mean_what_they_say_quick(pages):
    """A few regions; the few-hundred-region study is the slow test below and benchmarks/bench_docs.py.

    Bounds: low must stay legible (CER < 0.15, clean is ~0.02); medium must be clearly worse (> 0.3 and > low +
    0.2; measured ~0.6); high must be near total (> 0.9; empty output scores 1.0)."""
    m = _levels_cer(pages, 3, clean=False)
    assert m["low"] < 0.15 and m["medium"] > max(0.3, m["low"] + 0.2) and m["high"] > 0.9, m


@pytest.mark.slow
@needs_tesseract
def test_levels_mean_what_they_say_study():
    pages = [render_page(i, 21) for i in range(40)]
    m = _levels_cer(pages, 100, clean=True)
    assert m["clean"] < 0.08 and m["low"] < 0.12, m
    assert m["medium"] > max(0.35, m["low"] + 0.25), m
    assert m["high"] > 0.95, m
