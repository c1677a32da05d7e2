"""A seeded toy knowledge corpus whose pages a parser can misread: two-column tape pages rendered to PDF with fpdf2.

Notable:
- A fact is `entity colour home` (a made-up name, one of 8 colours, one of 8 places), typed down a column on the
  demo's tape rows (grid.py: one character per 14-px cell, rows 1/3/5), so the from-scratch model can read it. A
  page holds two facts side by side (cols 0-5 and 8-13), or one fact beside a figure of that entity (a text-free
  picture in the entity's colour) whose caption names it. Reading order: left column, then right.
- The content stream is written by one of three producers, as real PDF writers do: `flow` (column by column, as
  LaTeX or fpdf2's text_columns), `lines` (each visual line across the page, as OCR text layers and table-based
  layouts), `floats` (figures and captions last). The parser (parser.py) reads the stream as it is; which pages it
  misorders is measured, never assumed (recipes/unified_vs_parser.py).
- `pages()` gives the project's `Page`s of the same PDF: the pdfium render plus exact regions (a fact = one
  paragraph of three lines, a caption) in true reading order, as synthetic.py knows its regions.
- Everything is a pure function of (seed, config): `make_corpus` draws facts, pages and styles from
  `random.Random(f"knowledge:{seed}")`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlmcook.data.docs.grid import CELL, MONO_FONTS, TEXT_ROWS, VIEW_SIZE
from vlmcook.data.docs.page import Line, Page, Region, union_box
from vlmcook.data.image import IMAGE_MARKER

COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "pink": (230, 120, 170),
           "grey": (128, 128, 128), "gold": (210, 170, 40), "teal": (30, 140, 140), "black": (20, 20, 20)}
HOMES = ("north", "south", "east", "west", "hills", "coast", "lake", "woods")
PRODUCERS = ("flow", "lines", "floats")
COLUMNS = (0, 8)  # first cell of each column; a column is 6 cells wide, a 2-cell gutter between
COLUMN_CELLS = 6
FIGURE_ROWS = 4  # a figure covers rows 0-3 of its column; its caption sits on TEXT_ROWS[-1]
LINE_PAD = 3  # a line's box reaches this far above and below its cell row: descenders end ~2.5 px below it


def question(entity: str) -> str:
    return f"About {entity}?"


@dataclass(frozen=True)
class Fact:
    entity: str
    colour: str
    home: str

    @property
    def lines(self) -> tuple[str, str, str]:
        return (self.entity, self.colour, self.home)

    @property
    def text(self) -> str:  # also the answer to `question(entity)`
        return " ".join(self.lines)


@dataclass(frozen=True)
class Block:
    kind: str  # "fact": the fact's three lines; "figure": a picture of the fact's entity + its name as caption
    column: int  # 0 = left, 1 = right
    fact: Fact


@dataclass(frozen=True)
class PageSpec:
    blocks: tuple[Block, ...]  # in reading order
    producer: str
    font: tuple[str, str]  # (family, style) of grid.MONO_FONTS
    size: int  # font size, pt (= px at 72 dpi)
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]


@dataclass(frozen=True)
class KnowledgeConfig:
    qa_entities: int = 40  # facts in the documents and in the shared knowledge-QA pool
    held_entities: int = 40  # facts in the documents only: the held-out knowledge questions
    repeats: int = 3  # pages each document fact appears on
    docqa_pages: int = 100  # pages of fresh facts for the shared document-QA pool
    eval_pages: int = 40  # held-out pages of fresh facts (document QA, OCR)
    figure_prob: float = 0.25
    producer_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # flow, lines, floats


@dataclass(frozen=True)
class Corpus:
    qa: tuple[Fact, ...]
    held: tuple[Fact, ...]
    docs: tuple[PageSpec, ...]
    docqa: tuple[PageSpec, ...]
    eval: tuple[PageSpec, ...]


def _names(rng: random.Random, n: int) -> list[str]:
    cons, vows, taken, out = "bdfgklmnprstvz", "aeiou", set(COLOURS) | set(HOMES), []
    while len(out) < n:
        name = "".join(rng.choice(cons if k % 2 == 0 else vows) for k in range(rng.randint(3, 5)))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _style(rng: random.Random, blocks: tuple[Block, ...], weights) -> PageSpec:
    return PageSpec(blocks, rng.choices(PRODUCERS, weights=weights)[0], rng.choice(MONO_FONTS), rng.randint(14, 16),
                    tuple(rng.randint(0, 70) for _ in range(3)), tuple(rng.randint(225, 255) for _ in range(3)))


def _layout(rng: random.Random, facts: list[Fact], cfg: KnowledgeConfig) -> list[PageSpec]:
    """Facts (in order) onto pages: a figure page takes one fact, a text page two with different entities."""
    pages, i = [], 0
    while i < len(facts):
        left_over = i + 1 == len(facts) or facts[i + 1].entity == facts[i].entity
        if left_over or rng.random() < cfg.figure_prob:
            fig = rng.randrange(2)  # the figure's column
            blocks = sorted([Block("figure", fig, facts[i]), Block("fact", 1 - fig, facts[i])], key=lambda b: b.column)
            i += 1
        else:
            blocks = [Block("fact", 0, facts[i]), Block("fact", 1, facts[i + 1])]
            i += 2
        pages.append(_style(rng, tuple(blocks), cfg.producer_weights))
    return pages


def make_corpus(seed: int, cfg: KnowledgeConfig = KnowledgeConfig()) -> Corpus:
    rng = random.Random(f"knowledge:{seed}")
    fresh = 2 * (cfg.docqa_pages + cfg.eval_pages)  # enough for two facts per page
    names = _names(rng, cfg.qa_entities + cfg.held_entities + fresh)
    facts = [Fact(n, rng.choice(sorted(COLOURS)), rng.choice(HOMES)) for n in names]
    known = facts[:cfg.qa_entities + cfg.held_entities]
    slots = [f for f in known for _ in range(cfg.repeats)]
    rng.shuffle(slots)
    rest = facts[len(known):]
    docqa = _layout(rng, rest[:2 * cfg.docqa_pages], cfg)[:cfg.docqa_pages]
    used = {b.fact.entity for p in docqa for b in p.blocks}
    evals = _layout(rng, [f for f in rest if f.entity not in used], cfg)[:cfg.eval_pages]
    return Corpus(tuple(known[:cfg.qa_entities]), tuple(known[cfg.qa_entities:]), tuple(_layout(rng, slots, cfg)),
                  tuple(docqa), tuple(evals))


# ---- geometry ---------------------------------------------------------------------------------------------------
def _cells(row: int, col: int, n: int) -> tuple[int, int, int, int]:
    return (col * CELL, row * CELL - LINE_PAD, (col + n) * CELL, (row + 1) * CELL + LINE_PAD)


def _texts(block: Block) -> list[tuple[int, int, str]]:
    """(row, first cell, text) of each line the block types."""
    col = COLUMNS[block.column]
    if block.kind == "figure":
        return [(TEXT_ROWS[-1], col, block.fact.entity)]
    return [(row, col, s) for row, s in zip(TEXT_ROWS, block.fact.lines)]


def figure_box(block: Block) -> tuple[int, int, int, int]:
    col = COLUMNS[block.column]
    return (col * CELL, 0, (col + COLUMN_CELLS) * CELL, FIGURE_ROWS * CELL)


def figure_image(fact: Fact, scale: int = 2) -> Image.Image:
    """A text-free picture of the entity: a shape chosen by its name, drawn in its colour."""
    x1, y1, x2, y2 = figure_box(Block("figure", 0, fact))
    w, h = (x2 - x1) * scale, (y2 - y1) * scale
    img = Image.new("RGB", (w, h), (246, 244, 238))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w - 1, h - 1], outline=(90, 90, 90), width=scale)
    shape = sum(map(ord, fact.entity)) % 3
    box = [w * 0.25, h * 0.15, w * 0.75, h * 0.85]
    fill = COLOURS[fact.colour]
    if shape == 0:
        d.ellipse(box, fill=fill)
    elif shape == 1:
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(w / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def regions(spec: PageSpec) -> list[Region]:
    """Exact regions in reading order: a fact is one paragraph of three lines, a figure's caption one line."""
    out = []
    for b in spec.blocks:
        lines = tuple(Line(s, _cells(row, col, len(s))) for row, col, s in _texts(b))
        kind = "caption" if b.kind == "figure" else "paragraph"
        out.append(Region(" ".join(ln.text for ln in lines), union_box(ln.bbox for ln in lines), len(out), kind,
                          lines))
    return out


def reading_text(spec: PageSpec) -> str:
    """The page's words in true reading order, whitespace-normalised (what a correct parser would give)."""
    return " ".join(r.text for r in regions(spec))


# ---- PDF --------------------------------------------------------------------------------------------------------
def _ops(spec: PageSpec) -> list[tuple]:
    """The page's drawing operations in the producer's content-stream order: ("text", row, col, s) and
    ("figure", block)."""
    def block_ops(b: Block) -> list[tuple]:
        return ([("figure", b)] if b.kind == "figure" else []) + [("text", *t) for t in _texts(b)]

    flow = [op for b in spec.blocks for op in block_ops(b)]
    if spec.producer == "lines":  # top to bottom, left to right: a figure starts on row 0
        return sorted(flow, key=lambda op: (0, figure_box(op[1])[0]) if op[0] == "figure" else (op[1], op[2]))
    if spec.producer == "floats":
        floats = [b for b in spec.blocks if b.kind == "figure"]
        return [op for b in spec.blocks if b not in floats for op in block_ops(b)] + \
            [op for b in floats for op in block_ops(b)]
    return flow


def write_pdf(specs, path: str | Path, fonts: dict) -> Path:
    """One PDF page per spec, VIEW_SIZE points (= pixels at 72 dpi), each glyph centred in its 14-pt cell."""
    from fpdf import FPDF

    from vlmcook.data.docs.synthetic import _font

    pdf = FPDF(unit="pt", format=VIEW_SIZE)
    pdf.set_margin(0)
    pdf.set_auto_page_break(False)
    for family, style in MONO_FONTS:
        pdf.add_font(f"{family}-{style}", "", fonts[family][style])
    for spec in specs:
        pdf.add_page()
        pdf.set_fill_color(*spec.paper)
        pdf.rect(0, 0, *VIEW_SIZE, style="F")
        pdf.set_font("-".join(spec.font), size=spec.size)
        pdf.set_text_color(*spec.ink)
        pdf.set_char_spacing(0)  # get_string_width counts the current spacing in
        adv = pdf.get_string_width("m")  # monospace advance; char spacing makes every glyph step one cell
        pdf.set_char_spacing(CELL - adv)
        ascent, descent = _font(fonts[spec.font[0]][spec.font[1]], spec.size).getmetrics()
        for op in _ops(spec):
            if op[0] == "figure":
                x1, y1, x2, y2 = figure_box(op[1])
                pdf.image(figure_image(op[1].fact), x=x1, y=y1, w=x2 - x1, h=y2 - y1)
            else:
                _, row, col, s = op
                # baseline where grid.py's Pillow anchor "mm" puts it: the middle of ascent and descent on the
                # cell's middle, so glyphs sit as on the tape pages the vision step learned from
                pdf.text(col * CELL + (CELL - adv) / 2, row * CELL + CELL / 2 + (ascent - descent) / 2, s)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))
    return path


def pages(pdf_path: str | Path, specs, name: str) -> list[Page]:
    """The PDF's pages as the project's `Page`s: pdfium's render at 72 dpi + the specs' exact regions."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(str(pdf_path))
    try:
        if len(doc) != len(specs):
            raise ValueError(f"{pdf_path}: {len(doc)} pages for {len(specs)} page specs")
        return [Page(doc[i].render(scale=1).to_pil().convert("RGB"), regions(s), f"knowledge:{name}#{i + 1}",
                     {"producer": s.producer, "layout": s.blocks[0].kind + "+" + s.blocks[1].kind}).validate()
                for i, s in enumerate(specs)]
    finally:
        doc.close()


# ---- records ----------------------------------------------------------------------------------------------------
def qa_records(facts, name: str) -> list[dict]:
    """Knowledge QA without a page: `About kelp?` -> `kelp red north`."""
    return [{"id": f"{name}:{f.entity}", "messages": [{"role": "user", "content": question(f.entity)},
                                                     {"role": "assistant", "content": f.text}]} for f in facts]


def write_docqa(page_list: list[Page], specs, folder: Path) -> Path:
    """Document QA with the (clean) page: one record per fact on each page, the question before the page."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "samples.jsonl", "w", encoding="utf-8") as f:
        for i, (page, spec) in enumerate(zip(page_list, specs)):
            rel = f"images/{i:06d}.png"
            _save(page.image, folder / rel)
            for b in spec.blocks:
                if b.kind == "fact":
                    f.write(json.dumps({"id": f"{page.source}:{b.fact.entity}", "images": [rel], "messages": [
                        {"role": "user", "content": f"{question(b.fact.entity)}\n{IMAGE_MARKER}"},
                        {"role": "assistant", "content": b.fact.text}]}) + "\n")
    return folder / "samples.jsonl"


def write_unified(page_list: list[Page], folder: Path, seed: int, ccfg, edit=None) -> Path:
    """Corrupted-page samples (samples.make_sample, the "page" task) with corruption drawn per line, so a masked
    colour can sit under a legible name; the target keeps each fact unwrapped (`kelp red north`), not one line per
    region. `edit(record) -> record` is applied before writing."""
    from vlmcook.data.docs.samples import SampleConfig, make_sample, page_text

    scfg = SampleConfig(tasks=("page",), task_weights=(1.0,), unit="line")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "samples.jsonl", "w", encoding="utf-8") as f:
        for i, page in enumerate(page_list):
            record, cor = make_sample(page, seed, ccfg, scfg)
            record["messages"][1]["content"] = page_text(page.regions)
            rel = f"images/{i:06d}.png"
            _save(cor.image, folder / rel)
            record = {**record, "images": [rel]}
            f.write(json.dumps(edit(record) if edit else record) + "\n")
    return folder / "samples.jsonl"


def _save(img: Image.Image, path: Path) -> None:
    from vlmcook.data.docs.samples import save_image

    save_image(img, path)
