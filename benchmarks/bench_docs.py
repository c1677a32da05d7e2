"""Document-data benchmark: throughput of rendering / PDF ingestion / corruption on 1 and 2 processes, and the
tesseract character error rate per corruption level over a few hundred regions.

    .venv/bin/python benchmarks/bench_docs.py                 # ~2 min: 60 regions x 4 readings
    .venv/bin/python benchmarks/bench_docs.py --regions 300 --write-report   # the numbers in reports/docs_data.md

Prints tables; with --write-report it replaces the block between the bench markers in reports/docs_data.md and
writes reports/docs_contact_sheet.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from vlmcook.data.docs.contact import contact_sheet
from vlmcook.data.docs.corrupt import LEVELS, CorruptConfig, corrupt_page
from vlmcook.data.docs.pdf import find_pdfs, read_pdf
from vlmcook.data.docs.synthetic import render_page
from vlmcook.data.docs.text import TextSource

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "docs_data.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _render(i):
    return render_page(i, 0)


def _corrupt(page):
    return corrupt_page(page, 0).levels


def _ingest(path):
    return len(read_pdf(path).pages)


def _noop(x):
    return x


def _rate(fn, items, procs: int) -> tuple[float, float]:
    """(items per wall second, CPU seconds per item); a process pool is started and warmed up before the clock
    starts. CPU time is only measured in-process (procs == 1), else NaN."""
    if procs == 1:
        t, c = time.perf_counter(), time.process_time()
        list(map(fn, items))
        return len(items) / (time.perf_counter() - t), (time.process_time() - c) / len(items)
    with Pool(procs) as pool:
        pool.map(_noop, range(procs))
        t = time.perf_counter()
        pool.map(fn, items, chunksize=1)
        return len(items) / (time.perf_counter() - t), float("nan")


def _make_pdfs(folder: Path, files: int, pages: int) -> int:
    from fpdf import FPDF

    text, rng = TextSource.builtin(), __import__("random").Random(0)
    for f in range(files):
        pdf = FPDF()
        for _ in range(pages):
            pdf.add_page()
            pdf.set_font("Helvetica", "B", 18)
            pdf.multi_cell(0, 10, text.title(rng), new_x="LMARGIN", new_y="NEXT")
            pdf.set_font("Times", size=12)
            for _ in range(5):
                pdf.multi_cell(0, 6, text.paragraph(rng), new_x="LMARGIN", new_y="NEXT")
                pdf.ln(4)
        pdf.output(str(folder / f"doc{f}.pdf"))
    return files * pages


def throughput(n: int) -> list[tuple[str, float, float, float]]:
    """(stage, pages/s on 1 process, pages/s on 2 processes, CPU s per page)."""
    rows = []
    (r1, cpu), (r2, _) = _rate(_render, list(range(n)), 1), _rate(_render, list(range(n, 2 * n)), 2)
    rows.append(("synthetic rendering", r1, r2, cpu))
    pages = [render_page(i, 0) for i in range(n)]  # pre-rendered; the 2-process rate includes shipping them
    (c1, cpu), (c2, _) = _rate(_corrupt, pages, 1), _rate(_corrupt, pages, 2)
    rows.append(("corruption (default config)", c1, c2, cpu))
    with tempfile.TemporaryDirectory() as d:
        per_file = max(2, n // 4)
        _make_pdfs(Path(d), 4, per_file)
        files = [str(p) for p in find_pdfs(d)]
        (p1, cpu), (p2, _) = _rate(_ingest, files, 1), _rate(_ingest, files, 2)
    rows.append(("PDF ingestion (render 144 dpi + text layer)", p1 * per_file, p2 * per_file, cpu / per_file))
    return rows


def _cer_job(arg):
    from vlmcook.data.docs.ocr import read_region, cer, word_recall

    page_index, orders = arg
    os.environ["OMP_THREAD_LIMIT"] = "1"
    page = render_page(page_index, 21)
    by = {r.order: r for r in page.regions}
    images = {"clean": page.image}
    for lv in LEVELS:
        images[lv] = corrupt_page(page, 0, CorruptConfig(levels=(lv,), weights=(1.0,), region_fraction=1.0)).image
    out = []
    for o in orders:
        reads = {k: read_region(img, by[o]) for k, img in images.items()}
        out.append((by[o].kind, {k: cer(by[o].text, t) for k, t in reads.items()},
                    {k: word_recall(by[o].text, t) for k, t in reads.items()}))
    return out


def cer_study(n_regions: int, procs: int) -> list[tuple[str, dict]]:
    """The same regions read clean and at each level (paired), regions sampled from synthetic pages."""
    rng = np.random.default_rng(0)
    jobs, total, i = [], 0, 0
    while total < n_regions:
        page = render_page(i, 21)
        ok = [r.order for r in page.regions if 3 <= len(r.text) <= 300]
        take = sorted(rng.choice(ok, size=min(len(ok), 3, n_regions - total), replace=False).tolist())
        jobs.append((i, take))
        total, i = total + len(take), i + 1
    with Pool(procs) as pool:
        return [x for xs in pool.imap(_cer_job, jobs) for x in xs]


def _cer_table(res) -> list[str]:
    lines = ["| reading | regions | mean CER | median CER | CER < 0.1 | CER > 0.9 | words recovered |",
             "|---|---|---|---|---|---|---|"]
    for k in ("clean",) + LEVELS:
        v, w = np.array([c[k] for _, c, _ in res]), np.array([r[k] for _, _, r in res])
        lines.append(f"| {k} | {len(v)} | {v.mean():.3f} | {np.median(v):.3f} | {np.mean(v < 0.1):.0%} | "
                     f"{np.mean(v > 0.9):.0%} | {w.mean():.0%} |")
    return lines


def _kind_table(res) -> list[str]:
    kinds = sorted({k for k, _, _ in res})
    lines = ["| kind | regions | " + " | ".join(("clean",) + LEVELS) + " |", "|---|---|" + "---|" * 4]
    for kd in kinds:
        sub = [c for k, c, _ in res if k == kd]
        lines.append(f"| {kd} | {len(sub)} | " + " | ".join(f"{np.mean([c[x] for c in sub]):.2f}"
                                                         for x in ("clean",) + LEVELS) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=16, help="pages per throughput measurement")
    ap.add_argument("--regions", type=int, default=60, help="regions in the tesseract study")
    ap.add_argument("--write-report", action="store_true")
    args = ap.parse_args()
    if shutil.which("tesseract") is None:
        raise SystemExit("tesseract not found: apt-get install tesseract-ocr tesseract-ocr-eng")
    load = os.getloadavg()[0]
    rows = throughput(args.pages)
    out = [f"Machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
           f"load average {load:.1f} at start (the machine is shared: absolute rates are noisy).", "",
           "| stage | pages/s, 1 process | pages/s, 2 processes | ratio | CPU s / page | 2-core bound (2 / CPU s) |",
           "|---|---|---|---|---|---|"]
    out += [f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {cpu:.3f} | {2 / cpu:.1f} |" for name, a, b, cpu in rows]
    t = time.perf_counter()
    res = cer_study(args.regions, 2)
    out += ["", f"Tesseract 5 (psm 6, 7 for single lines) on {len(res)} regions of synthetic pages, each read "
            f"clean and at every level ({time.perf_counter() - t:.0f} s):", ""] + _cer_table(res)
    out += ["", "Mean CER by region kind:", ""] + _kind_table(res)
    text = "\n".join(out)
    print(text)
    if args.write_report:
        pages = [corrupt_page(render_page(i, 0), 0) for i in range(4)]
        print("contact sheet:", contact_sheet(pages, ROOT / "reports" / "docs_contact_sheet.png"))
        body = REPORT.read_text() if REPORT.exists() else f"# Document data\n\n{START}\n{END}\n"
        head, rest = body.split(START, 1)
        REPORT.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
        print("updated", REPORT)


if __name__ == "__main__":
    main()
