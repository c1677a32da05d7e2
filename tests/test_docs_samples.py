"""Samples: box format, prompts/targets, JSONL input, the CLI end to end, and the streaming dataset."""

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlmcook.data.docs.cli import main
from vlmcook.data.docs.corrupt import CorruptConfig
from vlmcook.data.docs.jsonl import iter_jsonl
from vlmcook.data.docs.page import Region
from vlmcook.data.docs.samples import IMAGE_MARKER, SampleConfig, make_sample, norm_box, page_text
from vlmcook.data.docs.synthetic import render_page


def test_norm_box_hand_values():
    assert norm_box((0, 0, 200, 100), (200, 100)) == (0, 0, 1000, 1000)
    assert norm_box((50, 25, 150, 75), (200, 100)) == (250, 250, 750, 750)
    assert norm_box((1, 1, 3, 2), (3, 3)) == (333, 333, 1000, 667)


def test_page_text_tables_become_rows():
    regs = [Region("Title", (0, 0, 1, 1), 0, "title"),
            Region("a", (0, 0, 1, 1), 1, "table_cell", cell=(1, 0, 0)),
            Region("b", (0, 0, 1, 1), 2, "table_cell", cell=(1, 0, 1)),
            Region("c", (0, 0, 1, 1), 3, "table_cell", cell=(1, 1, 0)),
            Region("d", (0, 0, 1, 1), 4, "table_cell", cell=(1, 1, 1)),
            Region("After.", (0, 0, 1, 1), 5, "paragraph")]
    assert page_text(regs[::-1]) == "Title\n\n| a | b |\n| c | d |\n\nAfter."


def test_region_task_names_corrupted_boxes_and_answers_with_ref_box():
    page = render_page(4, 0)
    cfg = SampleConfig(tasks=("regions",), task_weights=(1.0,))
    rec, cor = make_sample(page, 0, CorruptConfig(), cfg)
    user, assistant = rec["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert user["content"].startswith(IMAGE_MARKER + "\n") and user["content"].count("<image>") == 1
    asked = re.findall(r"<box>(\d+) (\d+) (\d+) (\d+)</box>", user["content"])
    answers = re.findall(r"^<ref>(.*)</ref><box>(\d+) (\d+) (\d+) (\d+)</box>$", assistant["content"], re.M)
    chosen = [r for r in page.in_reading_order() if r.order in cor.levels]
    assert len(asked) == len(answers) == len(chosen) >= 1
    w, h = page.image.size
    for (x1, y1, x2, y2), (text, *box), r in zip(asked, answers, chosen):
        assert tuple(box) == (x1, y1, x2, y2) and text == r.text
        # the 0-1000 box maps back onto the pixel box within rounding (1000 steps over the side)
        assert abs(int(x1) * w / 1000 - r.bbox[0]) <= w / 1000 and abs(int(y2) * h / 1000 - r.bbox[3]) <= h / 1000
    assert {m["level"] for m in rec["meta"]["regions"] if m["level"]} <= {"low", "medium", "high"}


def test_page_task_target_is_the_clean_text_in_reading_order():
    page = render_page(5, 0)
    rec, cor = make_sample(page, 0, CorruptConfig(), SampleConfig(tasks=("page",), task_weights=(1.0,)))
    target = rec["messages"][1]["content"]
    assert target == page_text(page.regions)
    pos = [target.find(r.text) for r in page.in_reading_order() if r.cell is None]
    assert -1 not in pos and pos == sorted(pos)
    assert sum(rec["meta"]["levels"].values()) == len(cor.levels) >= 1


def test_jsonl_source_reads_good_lines_and_names_bad_ones(tmp_path):
    img = Image.new("RGB", (400, 120), "white")
    ImageDraw.Draw(img).text((10, 10), "Hello", fill="black")
    img.save(tmp_path / "a.png")
    good = {"image": "a.png", "id": "a", "regions": [{"text": "Hello", "bbox": [8, 8, 60, 24], "kind": "title"},
                                                     {"text": "more", "bbox": [8, 40, 60, 60]}]}
    lines = [good, {"image": "a.png", "regions": [{"text": "x", "bbox": [0, 0, 10, 10], "kind": "blurb"}]},
             {"image": "missing.png", "regions": [{"text": "x", "bbox": [0, 0, 10, 10]}]},
             {"image": "a.png", "regions": [{"text": "x", "bbox": [0, 0, 900, 10]}]}]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = list(iter_jsonl(path))
    page = out[0][0]
    assert page.source == "jsonl:a" and [r.kind for r in page.regions] == ["title", "paragraph"]
    skips = [s for p, s in out if p is None]
    assert [w for w, _ in skips] == ["s.jsonl:2", "s.jsonl:3", "s.jsonl:4", "s.jsonl:5"]
    assert "kind 'blurb'" in skips[0][1] and "cannot read image" in skips[1][1]
    assert "outside the 400x120 image" in skips[2][1]
    # a line that is not UTF-8 is skipped by its number; the lines after it still count; a BOM is accepted
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n\xff\xfe{\n" + json.dumps(good).encode())
    out = list(iter_jsonl(path))
    assert [p is not None for p, _ in out] == [True, False, True] and out[1][1][0] == "s.jsonl:2"
    assert "utf-8" in out[1][1][1]


def test_cli_refuses_non_finite_weights_and_fails_when_nothing_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--synthetic", "1", "--out", str(tmp_path / "w"), "--level-weights", "nan,1,1"])
    assert "--level-weights: 'nan,1,1': expected comma-separated finite numbers" in capsys.readouterr().err
    (tmp_path / "s.jsonl").write_text('{"image": "missing.png", "regions": []}\n')
    assert main(["--jsonl", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no page written (1 inputs skipped, listed above)" in capsys.readouterr().err


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["--synthetic", "3", "--out", str(out), "--seed", "9", "--quiet", "--contact", "2", *extra]) == 0
    return out


def test_cli_same_output_for_any_worker_count_and_summary(tmp_path, capsys):
    a, b = _run(tmp_path, "a", "--workers", "1"), _run(tmp_path, "b", "--workers", "2")
    assert (a / "samples.jsonl").read_text() == (b / "samples.jsonl").read_text()
    recs = [json.loads(x) for x in (a / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    for r in recs:
        assert np.array_equal(np.asarray(Image.open(a / r["images"][0])), np.asarray(Image.open(b / r["images"][0])))
    c = _run(tmp_path, "c", "--workers", "1", "--seed", "10")
    assert (c / "samples.jsonl").read_text() != (a / "samples.jsonl").read_text()
    summary = json.loads((a / "summary.json").read_text())
    assert summary["pages"] == 3 and sum(summary["regions_per_level"].values()) >= 3
    assert (a / "contact_sheet.png").is_file()
    assert "corrupted regions per level" in capsys.readouterr().out


def test_cli_bad_arguments_fail_clearly(tmp_path, capsys):
    assert main(["--synthetic", "1", "--out", str(tmp_path), "--levels", "low,extreme", "--quiet"]) == 2
    assert "each must be one of" in capsys.readouterr().err
    assert main(["--synthetic", "1", "--out", str(tmp_path), "--corrupt", "medium_erase=lots", "--quiet"]) == 2
    assert "is not like the default 0.15" in capsys.readouterr().err
    assert main(["--pdf", str(tmp_path / "nope"), "--out", str(tmp_path), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--synthetic", "1", "--pdf", "x", "--out", str(tmp_path)])
