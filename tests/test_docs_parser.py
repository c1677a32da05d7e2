"""The parser baseline (data/docs/parser.py) on PDFs written here with fpdf2: pypdfium2's order (and a real
misordering of a two-column page), figure crops in stream position, the SFT record, bad input, the CLI mode."""

import json

import numpy as np
import pytest

fpdf = pytest.importorskip("fpdf")
pdfium = pytest.importorskip("pypdfium2")
from PIL import Image  # noqa: E402

from vlmcook.data.docs import cli  # noqa: E402
from vlmcook.data.docs.parser import PROMPT, iter_parsed, run  # noqa: E402
from vlmcook.data.image import IMAGE_MARKER  # noqa: E402

LEFT = ["The harbour", "opened in", "the spring."]
RIGHT = ["Its museum", "closes on", "Mondays."]
TRUE_ORDER = " ".join(LEFT + RIGHT)


def _two_columns(pdf, by_rows: bool):
    """Two columns of three lines; by_rows: the stream writes each visual line across the page (as OCR text layers
    do), else column by column."""
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    cells = [(x, 30 + 8 * r, s) for x, col in ((20, LEFT), (110, RIGHT)) for r, s in enumerate(col)]
    for x, y, s in sorted(cells, key=lambda c: (c[1], c[0])) if by_rows else cells:
        pdf.text(x, y, s)


def _figure_page(pdf):
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.text(20, 30, "Above the figure.")
    pdf.image(Image.new("RGB", (60, 30), (220, 30, 30)), x=20, y=40, w=60, h=30)
    pdf.text(20, 85, "Figure 1: a red box.")


@pytest.fixture(scope="module")
def pdf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("parser_pdfs")
    pdf = fpdf.FPDF()
    _two_columns(pdf, by_rows=False)
    _two_columns(pdf, by_rows=True)
    _figure_page(pdf)
    pdf.add_page()  # 4: an image and no text layer (a scan)
    pdf.image(Image.new("RGB", (100, 50), "grey"), x=20, y=20, w=100)
    pdf.output(str(d / "doc.pdf"))
    enc = fpdf.FPDF()
    enc.add_page()
    enc.set_font("Helvetica", size=12)
    enc.text(20, 30, "secret")
    enc.set_encryption(owner_password="owner", user_password="user")
    enc.output(str(d / "locked.pdf"))
    scan = fpdf.FPDF()
    scan.add_page()
    scan.image(Image.new("RGB", (100, 50), "grey"), x=20, y=20, w=100)
    scan.output(str(d / "scan.pdf"))
    return d


@pytest.fixture(scope="module")
def parsed(pdf_dir):
    return list(iter_parsed(pdf_dir / "doc.pdf"))


def test_text_is_pypdfium2_order_and_a_two_column_page_is_read_across(pdf_dir, parsed):
    doc = pdfium.PdfDocument(str(pdf_dir / "doc.pdf"))
    for k in (0, 1):
        own = " ".join(doc[k].get_textpage().get_text_range().split())  # pdfium's order, whitespace collapsed
        assert parsed[k][0].text == own
    assert parsed[0][0].text == TRUE_ORDER  # written column by column: read right
    # written line by line: pdfium reads across the columns, so each sentence is cut by the other column's lines
    assert parsed[1][0].text == "The harbour Its museum opened in closes on the spring. Mondays."
    assert parsed[1][0].text != TRUE_ORDER and sorted(parsed[1][0].text.split()) == sorted(TRUE_ORDER.split())
    doc.close()


def test_figure_crop_sits_at_its_stream_position(parsed):
    page = parsed[2][0]
    assert [p if isinstance(p, str) else "IMG" for p in page.parts] == ["Above the figure.", "IMG",
                                                                        "Figure 1: a red box."]
    crop = np.asarray(page.figures[0], dtype=float)
    # 60 x 30 mm at 144 dpi, within a pixel of rounding
    assert abs(crop.shape[1] - 60 / 25.4 * 144) <= 2 and abs(crop.shape[0] - 30 / 25.4 * 144) <= 2
    assert np.abs(crop.mean((0, 1)) - (220, 30, 30)).max() < 12  # the red picture, not the page around it


def test_image_only_page_is_skipped_with_a_reason(pdf_dir, parsed):
    assert parsed[3] == (None, (f"{pdf_dir / 'doc.pdf'}#4", "no text layer"))


def test_record_is_the_sft_format_and_trains(parsed):
    import torch

    from vlmcook.config import PRESETS
    from vlmcook.data.docs.parser import record
    from vlmcook.data.tokenizer import Tokenizer
    from vlmcook.train.data import ListRecords, RecordSource

    page = parsed[2][0]
    rec = record(page, ["images/a.png"])
    assert rec["messages"][0] == {"role": "user", "content": PROMPT}
    assert rec["messages"][1]["content"] == f"Above the figure.\n{IMAGE_MARKER}\nFigure 1: a red box."
    assert rec["meta"]["figures"] == 1 and rec["meta"]["text"] == page.text
    rec["images"] = page.figures  # in memory, so the processor runs without files
    tok = Tokenizer.tiny(chars=True)
    sample = RecordSource(ListRecords([rec]), tok, PRESETS["tiny"], strict=True)[0]
    lo, hi = sample["image_bound"][0][0].tolist()
    labels = sample["labels"][0]
    assert (labels[lo:hi] == -100).all()  # the crop's tokens are context, not targets
    assert tok.decode([t for t in labels[hi:].tolist() if t != -100]).startswith("\nFigure 1: a red box.")
    assert isinstance(sample["input_ids"], torch.Tensor)


def test_run_writes_samples_crops_and_skips(pdf_dir, tmp_path):
    s = run(pdf_dir, tmp_path)
    assert s["pages"] == 3 and s["figures"] == 1
    why = {k["where"]: k["why"] for k in json.loads((tmp_path / "summary.json").read_text())["skipped"]}
    assert why == {str(pdf_dir / "locked.pdf"): "encrypted (password required)",
                   f"{pdf_dir / 'doc.pdf'}#4": "no text layer", f"{pdf_dir / 'scan.pdf'}#1": "no text layer"}
    recs = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["pdf:doc.pdf#1", "pdf:doc.pdf#2", "pdf:doc.pdf#3"]
    for r in recs:
        assert r["messages"][1]["content"].count(IMAGE_MARKER) == len(r["images"])
        for rel in r["images"]:
            assert Image.open(tmp_path / rel).size[0] > 100


def test_cli_parser_mode(pdf_dir, tmp_path, capsys):
    assert cli.main(["--synthetic", "2", "--out", str(tmp_path / "x"), "--mode", "parser"]) == 2
    assert "--mode parser reads PDFs" in capsys.readouterr().err
    assert cli.main(["--pdf", str(pdf_dir), "--out", str(tmp_path / "p"), "--mode", "parser", "--dpi", "72"]) == 0
    out = capsys.readouterr().out
    assert "pages parsed: 3" in out and "encrypted (password required)" in out
    assert len((tmp_path / "p" / "samples.jsonl").read_text().splitlines()) == 3
