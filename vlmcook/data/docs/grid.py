"""Tape pages: a title typed on the 14-px patch grid, one character per patch, for models trained from scratch.

A page is one 196 x 98 view (7 x 14 patches). The title runs like a typewriter tape over rows TEXT_ROWS, 14
characters a row, so character k sits in cell k (`grid_cells`) and a resampler query started on that cell
(train/scratch.py) can read it. Why a grid and a tape (measured, recipes/demo.py and reports/reading_recipe.md): a
from-scratch 1M-parameter ViT does not learn glyphs at arbitrary offsets in minutes of CPU (16-way word
classification, 1000 steps: 15% held-out accuracy vs 99% for a small CNN); with one glyph per patch it does.
Titles are random 3-5 word sequences over the built-in corpus's vocabulary, so no title is predictable from its
first word. Everything is a pure function of (seed, i).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlmcook.data.docs.page import Line, Page, Region
from vlmcook.data.docs.text import TextSource

CELL, GRID_ROWS, GRID_COLS = 14, 7, 14
VIEW_SIZE = (GRID_COLS * CELL, GRID_ROWS * CELL)  # (W, H) = (196, 98)
TEXT_ROWS = (1, 3, 5)  # the rows a title is typed on
TAPE = len(TEXT_ROWS) * GRID_COLS  # 42 characters at most
MONO_FONTS = (("DejaVuSansMono", "regular"), ("DejaVuSansMono", "bold"), ("LiberationMono", "regular"),
              ("LiberationMono", "bold"))


def grid_cells(n: int) -> list[tuple[int, int]]:
    """The (row, column) cell of tape position k for k < n (TEXT_ROWS x columns, row-major, cycling)."""
    cells = [(r, c) for r in TEXT_ROWS for c in range(GRID_COLS)]
    return [cells[k % len(cells)] for k in range(n)]


def random_titles(seed: int, n: int = 4000) -> TextSource:
    """n random 3-5 word titles over the built-in corpus's vocabulary (the corpus's own sentences would make a
    title predictable from its first word, and a model could then fit them without looking at the page)."""
    words = sorted({w for s in TextSource.builtin().sentences for w in re.findall(r"[A-Za-z]+", s)})
    rng = random.Random(f"demo-text:{seed}")
    return TextSource(tuple(" ".join(rng.choice(words) for _ in range(rng.randint(3, 5))) for _ in range(n)))


def grid_page(i: int, seed: int, titles: TextSource, fonts: dict) -> Page:
    """Page i: title i typed on the tape (words that do not fit the 42 cells are left out of image and text), in
    one of 4 monospace faces at 14-16 px, dark ink on light paper of random tint; one "title" region whose lines
    are the typed rows."""
    from vlmcook.data.docs.synthetic import _font

    rng = random.Random(f"demo-grid:{seed}:{i}")
    title = ""
    for word in titles.sentences[i % len(titles.sentences)].split():
        if len(title) + bool(title) + len(word) <= TAPE:
            title += " " * bool(title) + word
    family, style = rng.choice(MONO_FONTS)
    font = _font(fonts[family][style], rng.randint(14, 16))
    paper = tuple(rng.randint(225, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    img = Image.new("RGB", VIEW_SIZE, paper)
    draw = ImageDraw.Draw(img)
    lines = []
    for row, k0 in zip(TEXT_ROWS, range(0, len(title), GRID_COLS)):
        line = title[k0:k0 + GRID_COLS]
        for k, ch in enumerate(line):
            draw.text((k * CELL + CELL // 2, row * CELL + CELL // 2), ch, font=font, fill=ink, anchor="mm")
        lines.append(Line(line, (0, row * CELL, len(line) * CELL, (row + 1) * CELL)))
    bbox = (0, lines[0].bbox[1], max(ln.bbox[2] for ln in lines), lines[-1].bbox[3])
    region = Region(title, bbox, 0, "title", tuple(lines))
    return Page(img, [region], f"demo-grid:{seed}:{i}", {"font": f"{family}-{style}", "size": font.size}).validate()


def glyph_labels(page: Page, n: int) -> torch.Tensor:
    """[n] class of the character under each of the first n tape cells: printable ASCII - 32 (0 = empty cell)."""
    tape = page.regions[0].text.ljust(TAPE)
    return torch.tensor([ord(tape[TEXT_ROWS.index(r) * GRID_COLS + c]) - 32 for r, c in grid_cells(n)])


def write_grid_docs(folder: Path, n: int, seed: int, edit=None) -> tuple[Path, dict]:
    """Type + corrupt n tape pages (every region corrupted at one level) into `folder/samples.jsonl` +
    `folder/images/`; `edit(record) -> record` is applied before writing (e.g. the prompt order); a page whose
    corruption fails is skipped and counted by reason. -> (jsonl path, {page: reason})."""
    from tqdm import tqdm

    from vlmcook.data.docs.corrupt import CorruptConfig
    from vlmcook.data.docs.samples import SampleConfig, make_sample, save_image
    from vlmcook.data.docs.synthetic import find_fonts

    fonts, titles = find_fonts(), random_titles(seed)
    corrupt, sample = CorruptConfig(region_fraction=1.0), SampleConfig(tasks=("page",), task_weights=(1.0,))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    skipped = {}
    with open(folder / "samples.jsonl", "w", encoding="utf-8") as f:
        for i in tqdm(range(n), desc=f"pages (seed {seed})", unit="page"):
            page = grid_page(i, seed, titles, fonts)
            try:
                record, cor = make_sample(page, seed, corrupt, sample)
            except (IndexError, ValueError) as e:
                skipped[page.source] = f"{type(e).__name__}: {e}"
                continue
            rel = f"images/{i:06d}.png"
            save_image(cor.image, folder / rel)
            record = {**record, "images": [rel]}
            f.write(json.dumps(edit(record) if edit else record) + "\n")
    return folder / "samples.jsonl", skipped


class CopyText:
    """Text-only "repeat the text" records over random titles: the copying any pre-trained LLM can do, which
    reading a tape page reuses (the answer starts right after the source, as a page's text follows its image)."""

    def __init__(self, seed: int, n: int):
        self.titles = random_titles(seed, n).sentences

    def __len__(self) -> int:
        return len(self.titles)

    def record(self, i: int) -> dict:
        t = self.titles[i]
        return {"id": f"copy-{i}", "messages": [{"role": "user", "content": f"Repeat the text.\n{t}"},
                                                {"role": "assistant", "content": t}]}
