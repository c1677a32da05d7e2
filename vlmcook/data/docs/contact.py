"""Contact sheet: a PNG that lets a person see what the corruption levels do.

Top row: corrupted pages with each chosen region outlined in its level's colour (green low, orange medium, red
high). Below: one row per level with clean / corrupted crop pairs of regions drawn from those pages.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmcook.data.docs.corrupt import LEVELS, Corrupted

COLOURS = {"low": (0, 170, 0), "medium": (255, 140, 0), "high": (220, 0, 0)}


def _label_font(size: int):
    try:
        from vlmcook.data.docs.synthetic import find_fonts
        fams = find_fonts()
        return ImageFont.truetype(fams.get("DejaVuSans", next(iter(fams.values())))["regular"], size)
    except (FileNotFoundError, OSError):
        return ImageFont.load_default()


def _fit(img: Image.Image, w: int, h: int) -> Image.Image:
    s = min(w / img.width, h / img.height)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)


def _page_tile(c: Corrupted, h: int) -> Image.Image:
    img = c.image.copy()
    d = ImageDraw.Draw(img)
    width = max(2, img.width // 300)
    for r in c.page.regions:
        if r.order in c.levels:
            d.rectangle(r.bbox, outline=COLOURS[c.levels[r.order]], width=width)
    return _fit(img, 10_000, h)


def contact_sheet(items: list[Corrupted], path: str | Path, per_level: int = 4, page_h: int = 520,
                  cell: tuple[int, int] = (430, 110)) -> Path:
    font = _label_font(18)
    tiles = [_page_tile(c, page_h) for c in items]
    crops = {lv: [] for lv in LEVELS}
    for c in items:
        for r in c.page.in_reading_order():
            lv = c.levels.get(r.order)
            if lv and len(crops[lv]) < per_level and r.bbox[2] - r.bbox[0] > 60:
                crops[lv].append((c.page.image.crop(r.bbox), c.image.crop(r.bbox)))
    pw = max(sum(t.width + 10 for t in tiles) + 10, per_level * (cell[0] + 10) + 130)
    H = 50 + page_h + 20 + len(LEVELS) * (2 * cell[1] + 30)
    sheet = Image.new("RGB", (pw, H), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    d.text((10, 12), "outlines: " + ", ".join(LEVELS) + "  (green / orange / red); rows below: clean above, "
           "corrupted below", fill=(0, 0, 0), font=font)
    x = 10
    for t in tiles:
        sheet.paste(t, (x, 50))
        x += t.width + 10
    y = 50 + page_h + 20
    for lv in LEVELS:
        d.text((10, y + cell[1]), lv, fill=COLOURS[lv], font=font)
        for k, (clean, bad) in enumerate(crops[lv]):
            cx = 120 + k * (cell[0] + 10)
            sheet.paste(_fit(clean, *cell), (cx, y))
            sheet.paste(_fit(bad, *cell), (cx, y + cell[1] + 4))
        y += 2 * cell[1] + 30
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
