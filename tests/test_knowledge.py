"""The toy knowledge corpus (data/docs/knowledge.py): seeded and pure, disjoint splits, exact boxes on the rendered
PDF (ink inside them, checked on pdfium's render), the producers' stream orders as pypdfium2 reads them, records."""

import json
import random
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("fpdf")
pytest.importorskip("pypdfium2")

from vlmcook.data.docs import knowledge as K  # noqa: E402
from vlmcook.data.docs.grid import CELL, VIEW_SIZE  # noqa: E402
from vlmcook.data.image import IMAGE_MARKER  # noqa: E402

CFG = K.KnowledgeConfig(qa_entities=6, held_entities=6, repeats=3, docqa_pages=4, eval_pages=4)


@pytest.fixture(scope="module")
def corpus():
    return K.make_corpus(3, CFG)


@pytest.fixture(scope="module")
def rendered(corpus, tmp_path_factory):
    from vlmcook.data.docs.synthetic import find_fonts

    path = K.write_pdf(corpus.docs, tmp_path_factory.mktemp("knowledge") / "docs.pdf", find_fonts())
    return path, K.pages(path, corpus.docs, "docs")


def test_corpus_is_seeded_and_pure(corpus):
    random.seed(123)  # global RNG state must not matter
    again = K.make_corpus(3, CFG)
    random.seed(456)
    assert again == corpus == K.make_corpus(3, CFG)
    assert K.make_corpus(4, CFG) != corpus
    assert K.figure_image(corpus.qa[0]).tobytes() == K.figure_image(corpus.qa[0]).tobytes()


def test_splits_are_disjoint_and_facts_repeat(corpus):
    docs_facts = Counter(b.fact for p in corpus.docs for b in p.blocks if b.kind == "fact")
    assert set(docs_facts) == set(corpus.qa) | set(corpus.held)
    assert set(docs_facts.values()) == {CFG.repeats}
    names = [{f.entity for f in corpus.qa}, {f.entity for f in corpus.held},
             {b.fact.entity for p in corpus.docqa for b in p.blocks},
             {b.fact.entity for p in corpus.eval for b in p.blocks}]
    assert sum(map(len, names)) == len(set().union(*names))  # no entity in two splits
    assert len(corpus.docqa) == CFG.docqa_pages and len(corpus.eval) == CFG.eval_pages
    for p in corpus.docs + corpus.docqa + corpus.eval:
        facts = [b.fact.entity for b in p.blocks if b.kind == "fact"]
        assert len(facts) == len(set(facts)) and [b.column for b in p.blocks] == [0, 1]
        for b in p.blocks:
            if b.kind == "figure":  # the caption names what the figure shows: the fact beside it
                assert [x.fact for x in p.blocks if x.kind == "fact"] == [b.fact]
        assert all(len(s) <= K.COLUMN_CELLS for b in p.blocks for s in b.fact.lines)


def test_ink_lies_inside_the_regions_and_figures(corpus, rendered):
    _, pages = rendered
    for page, spec in zip(pages, corpus.docs):
        assert page.image.size == VIEW_SIZE
        a = np.asarray(page.image.convert("L"), dtype=float)
        ink = np.abs(a - np.median(a)) > 60
        inside = np.zeros_like(ink)
        for r in page.regions:
            for ln in r.lines:
                x1, y1, x2, y2 = ln.bbox
                assert (x1 % CELL, (y1 + K.LINE_PAD) % CELL) == (0, 0)  # on the tape's cells
                assert (x2 - x1, y2 - y1) == (CELL * len(ln.text), CELL + 2 * K.LINE_PAD)
                for k in range(len(ln.text)):  # one glyph per cell, as on the tape pages the model reads
                    cell = ink[y1:y2, x1 + k * CELL:x1 + (k + 1) * CELL]
                    assert cell.sum() > 8 and not cell[:, 0].any() and not cell[:, -1].any(), (spec, ln, k)
                inside[y1:y2, x1:x2] = True
        for b in spec.blocks:
            if b.kind == "figure":
                x1, y1, x2, y2 = K.figure_box(b)
                inside[y1:y2, x1:x2] = True
        assert ink[~inside].sum() == 0  # nothing drawn outside the boxes


def test_regions_are_the_reading_order(corpus, rendered):
    _, pages = rendered
    for page, spec in zip(pages, corpus.docs):
        assert [r.order for r in page.regions] == list(range(len(page.regions)))
        assert [r.bbox[0] for r in page.regions] == sorted(r.bbox[0] for r in page.regions)  # left column first
        assert K.reading_text(spec) == " ".join(r.text for r in page.regions)


@pytest.mark.parametrize("producer", K.PRODUCERS)
def test_pdfium_reads_each_producers_stream_order(tmp_path, producer):
    """The same page written by each producer, read by pypdfium2: only the stream order changes what it returns."""
    import pypdfium2 as pdfium

    from vlmcook.data.docs.synthetic import find_fonts

    a, b = K.Fact("kelp", "red", "north"), K.Fact("zorn", "blue", "south")
    style = dict(font=("DejaVuSansMono", "regular"), size=15, ink=(0, 0, 0), paper=(250, 250, 250))
    specs = [K.PageSpec((K.Block("fact", 0, a), K.Block("fact", 1, b)), producer, **style),
             K.PageSpec((K.Block("figure", 0, a), K.Block("fact", 1, a)), producer, **style)]
    doc = pdfium.PdfDocument(str(K.write_pdf(specs, tmp_path / "p.pdf", find_fonts())))
    got = [" ".join(doc[i].get_textpage().get_text_range().split()) for i in range(2)]
    doc.close()
    want = {"flow": ["kelp red north zorn blue south", "kelp kelp red north"],
            "lines": ["kelp zorn red blue north south", "kelp red kelp north"],  # read across the columns
            # the caption is written last, but pdfium sorts the text objects of one visual line by x: the left
            # column's caption lands before `north`, on its line
            "floats": ["kelp red north zorn blue south", "kelp red kelp north"]}
    assert got == want[producer]


def test_records(corpus, rendered, tmp_path):
    from vlmcook.data.docs.corrupt import CorruptConfig

    _, pages = rendered
    qa = K.qa_records(corpus.held, "held")
    assert qa[0]["messages"] == [{"role": "user", "content": f"About {corpus.held[0].entity}?"},
                                 {"role": "assistant", "content": corpus.held[0].text}]
    path = K.write_docqa(pages[:3], corpus.docs[:3], tmp_path / "docqa")
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == sum(b.kind == "fact" for p in corpus.docs[:3] for b in p.blocks)
    assert all(r["messages"][0]["content"].endswith(IMAGE_MARKER) for r in recs)
    path = K.write_unified(pages, tmp_path / "unified", 0, CorruptConfig(levels=("high",), weights=(1.0,)))
    for page, line in zip(pages, path.read_text().splitlines()):
        r = json.loads(line)
        assert r["messages"][1]["content"] == "\n\n".join(reg.text for reg in page.regions)  # facts unwrapped
        masked = [x for x in r["meta"]["regions"] if x["level"] == "high"]
        assert masked and all(len(x["text"].split()) == 1 for x in r["meta"]["regions"])  # levels per line
