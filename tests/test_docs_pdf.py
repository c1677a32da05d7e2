"""PDF ingestion on PDFs made here with fpdf2: texts, blocks, kinds, boxes (tesseract), and bad input."""

import shutil

import numpy as np
import pytest

fpdf = pytest.importorskip("fpdf")
from PIL import Image  # noqa: E402

from vlmcook.data.docs.pdf import find_pdfs, read_pdf  # noqa: E402

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract not installed")
TITLE = "Annual Report of the Harbour Office"
P1 = ("The river rises in the northern hills and flows south for about four hundred kilometres before it reaches "
      "the sea. Early settlers built their villages on the higher ground, where the spring floods could not reach "
      "them.")
P2 = "The library holds more than two million books, maps and manuscripts, many of them donated by local families."
LEFT = "Engineers measured the flow of the river every hour and stored the readings in a central archive."
RIGHT = "The museum is open every day except Monday, and entry is free on the first Sunday of each month."
FOOT = "Page 7"


def _good_pdf(path):
    pdf = fpdf.FPDF()
    pdf.set_auto_page_break(False)
    pdf.add_page()  # 1: title, two paragraphs, footer
    pdf.set_font("Helvetica", "B", 22)
    pdf.set_xy(20, 25)
    pdf.cell(0, 12, TITLE)
    pdf.set_font("Helvetica", size=12)
    pdf.set_xy(20, 50)
    pdf.multi_cell(170, 7, P1)
    pdf.set_font("Times", size=13)
    pdf.set_xy(20, 90)
    pdf.multi_cell(170, 7, P2)
    pdf.set_font("Helvetica", size=9)
    pdf.set_xy(20, 285)
    pdf.cell(170, 5, FOOT, align="C")
    pdf.add_page()  # 2: two columns side by side
    pdf.set_font("Helvetica", size=12)
    pdf.set_xy(20, 40)
    pdf.multi_cell(80, 7, LEFT)
    pdf.set_xy(110, 40)
    pdf.multi_cell(80, 7, RIGHT)
    pdf.add_page()  # 3: white text only: in the text layer, invisible in the render
    pdf.set_text_color(255, 255, 255)
    pdf.set_xy(20, 40)
    pdf.cell(0, 10, "This text cannot be seen")
    pdf.set_text_color(0, 0, 0)
    pdf.add_page()  # 4: an image, no text layer
    pdf.image(Image.new("RGB", (200, 100), "gray"), x=20, y=20, w=100)
    pdf.add_page()  # 5: blank
    pdf.add_page()  # 6: one line on the page, one running off its right edge
    pdf.set_xy(20, 40)
    pdf.cell(0, 10, "Visible line here.")
    pdf.set_xy(150, 80)
    pdf.cell(0, 10, "This sentence runs past the right edge of the page and beyond it")
    pdf.output(str(path))


@pytest.fixture(scope="module")
def pdf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pdfs")
    _good_pdf(d / "good.pdf")
    enc = fpdf.FPDF()
    enc.add_page()
    enc.set_font("Helvetica", size=12)
    enc.cell(0, 10, "secret")
    enc.set_encryption(owner_password="owner", user_password="user")
    enc.output(str(d / "locked.pdf"))
    (d / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage")
    (d / "zero.pdf").write_bytes(b"")
    (d / "notes.PDF").write_text("just some text, not a PDF")
    return d


@pytest.fixture(scope="module")
def good(pdf_dir):
    return read_pdf(pdf_dir / "good.pdf")


def test_text_layer_grouped_into_blocks_with_kinds(good):
    p1, p2, p6 = good.pages
    assert [(r.kind, r.text) for r in p1.in_reading_order()] == [
        ("title", TITLE), ("paragraph", P1), ("paragraph", P2), ("footer", FOOT)]
    assert len(p1.regions[1].lines) == 3  # P1 wraps onto three lines at 170 mm
    assert [r.text for r in p2.in_reading_order()] == [LEFT, RIGHT]  # columns are not merged
    assert p1.image.size == (round(210 * 144 / 25.4), round(297 * 144 / 25.4))  # A4 at 144 dpi
    assert [r.text for r in p6.regions] == ["Visible line here."]  # the line running off the page is dropped


def test_boxes_sit_where_fpdf_put_the_text(good):
    p1 = good.pages[0]
    px = 144 / 25.4  # pixels per mm
    title = p1.in_reading_order()[0]
    x1, y1, x2, y2 = title.bbox
    assert abs(x1 - 20 * px) < 6  # cell starts at x = 20 mm (+ fpdf's 1 mm cell margin)
    assert 25 * px < y1 < y2 < 37 * px  # inside the 12 mm high cell at y = 25 mm


def test_bad_files_and_pages_are_skipped_with_reasons(pdf_dir, good):
    reasons = dict(good.skipped)
    assert "no visible text" in reasons[f"{pdf_dir / 'good.pdf'}#3"]
    assert reasons[f"{pdf_dir / 'good.pdf'}#4"] == "no text layer"
    assert reasons[f"{pdf_dir / 'good.pdf'}#5"] == "no text layer"
    files = find_pdfs(pdf_dir)
    assert [f.name for f in files] == ["broken.pdf", "good.pdf", "locked.pdf", "notes.PDF", "zero.pdf"]
    skipped = {}
    for f in files:
        res = read_pdf(f)
        skipped.update(res.skipped)
        if f.name != "good.pdf":
            assert res.pages == []
    assert skipped[str(pdf_dir / "locked.pdf")] == "encrypted (password required)"
    for name in ("broken.pdf", "zero.pdf", "notes.PDF"):
        assert skipped[str(pdf_dir / name)].startswith("cannot open")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_pdfs(pdf_dir / "nope")


def test_invisible_text_never_becomes_a_target(good):
    assert all("cannot be seen" not in r.text for p in good.pages for r in p.regions)


@needs_tesseract
def test_tesseract_reads_each_pdf_box(good):
    """Clean vector text at 144 dpi: tesseract's CER is ~0-2%; 0.05 leaves room for one or two misreads per
    region, while a box that missed a line of a paragraph would cost >= 0.3."""
    from vlmcook.data.docs.ocr import region_cers

    pairs = [(p.image, r) for p in good.pages for r in p.regions if r.kind != "footer"]
    cers = region_cers(pairs)
    assert np.mean(cers) < 0.05, list(zip([r.text[:30] for _, r in pairs], cers))
