"""Sources -> corrupted samples on disk, in parallel, deterministic for a seed whatever the worker count.

Notable:
- A `Source` cuts its input into independent jobs (a synthetic page index, a PDF file, a JSONL line); a job
  yields pages or skip reasons. Every random choice is keyed by (seed, page source), so the output does not depend
  on which process ran a job or in what order jobs finished; `imap` keeps the JSONL in job order.
- Image files are named by job and page within the job (`images/000012_0003.png`), also order-independent.
- The summary counts pages, samples per task, corrupted regions per level, and lists skipped inputs with reasons.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vlmcook.data.docs.corrupt import LEVELS, CorruptConfig
from vlmcook.data.docs.jsonl import parse_line
from vlmcook.data.docs.page import Page
from vlmcook.data.docs.pdf import PdfConfig, find_pdfs, iter_pdf
from vlmcook.data.docs.samples import SampleConfig, make_sample, save_image
from vlmcook.data.docs.synthetic import SyntheticConfig, find_fonts, render_page
from vlmcook.data.docs.text import TextSource


@dataclass
class Source:
    """Exactly one of: `synthetic` pages (None = endless, for streaming), a `pdf` folder, a `jsonl` file."""
    synthetic: int | None = None
    pdf: str | None = None
    jsonl: str | None = None
    endless: bool = False
    syn_cfg: SyntheticConfig = field(default_factory=SyntheticConfig)
    pdf_cfg: PdfConfig = field(default_factory=PdfConfig)
    text: TextSource | None = None  # synthetic text; None = built-in corpus

    def __post_init__(self):
        if sum(x is not None for x in (self.synthetic, self.pdf, self.jsonl)) + self.endless != 1:
            raise ValueError("give exactly one page source: synthetic=N, pdf=DIR or jsonl=FILE (or endless=True)")
        self._fonts = find_fonts() if (self.synthetic is not None or self.endless) else None

    def jobs(self) -> Iterator:
        if self.pdf is not None:
            yield from (str(p) for p in find_pdfs(self.pdf))
        elif self.jsonl is not None:
            path = Path(self.jsonl)
            if not path.is_file():
                raise FileNotFoundError(f"--jsonl {path}: no such file")
            with open(path, encoding="utf-8") as f:
                yield from ((n, line) for n, line in enumerate(f, 1) if line.strip())
        else:
            i = 0
            while self.endless or i < self.synthetic:
                yield i
                i += 1

    def pages(self, job, seed: int) -> Iterator[tuple[Page | None, tuple[str, str] | None]]:
        if self.pdf is not None:
            yield from iter_pdf(job, self.pdf_cfg, name=Path(job).relative_to(self.pdf).as_posix())
        elif self.jsonl is not None:
            n, line = job
            where = f"{Path(self.jsonl).name}:{n}"
            try:
                yield parse_line(line, Path(self.jsonl).parent, where), None
            except (ValueError, TypeError) as e:
                yield None, (where, str(e))
        else:
            yield render_page(job, seed, self.syn_cfg, self.text, self._fonts), None


@dataclass(frozen=True)
class RunConfig:
    out: str
    seed: int = 0
    corrupt: CorruptConfig = CorruptConfig()
    sample: SampleConfig = SampleConfig()
    image_format: str = "png"
    workers: int = 1
    contact: int = 6  # pages handed back for the contact sheet


_STATE: dict = {}


def _init(source: Source, run: RunConfig):
    _STATE.update(source=source, run=run)


def _job(arg) -> list[tuple]:
    """Process one job in a worker: ('sample', record, preview | None) and ('skip', where, why) tuples."""
    index, job = arg
    source, run = _STATE["source"], _STATE["run"]
    out = []
    for k, (page, skip) in enumerate(source.pages(job, run.seed)):
        if page is None:
            out.append(("skip",) + skip)
            continue
        record, cor = make_sample(page, run.seed, run.corrupt, run.sample)
        rel = f"images/{index:06d}_{k:04d}.{run.image_format}"
        save_image(cor.image, Path(run.out) / rel, run.image_format)
        record = {"id": record["id"], "images": [rel], "messages": record["messages"], "meta": record["meta"]}
        out.append(("sample", record, cor if index < run.contact and k == 0 else None))
    return out


def run(source: Source, run: RunConfig, progress: bool = True) -> dict:
    """Write `out/samples.jsonl`, `out/images/`, `out/summary.json`; return the summary (+ previews, not saved)."""
    from tqdm import tqdm

    out = Path(run.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = list(enumerate(source.jobs()))
    t0, tasks, levels, kinds, skipped, previews, n = time.time(), Counter(), Counter(), Counter(), [], [], 0
    pool = mp.get_context().Pool(run.workers, _init, (source, run)) if run.workers > 1 else None
    if pool is None:
        _init(source, run)
    results = pool.imap(_job, jobs) if pool else map(_job, jobs)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for res in tqdm(results, total=len(jobs), unit="job", disable=not progress, desc="docs"):
            for item in res:
                if item[0] == "skip":
                    skipped.append({"where": item[1], "why": item[2]})
                    continue
                _, record, preview = item
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
                tasks[record["meta"]["task"]] += 1
                levels.update({lv: c for lv, c in record["meta"]["levels"].items()})
                kinds.update(r["kind"] for r in record["meta"]["regions"])
                if preview is not None:
                    previews.append(preview)
    if pool:
        pool.close()
        pool.join()
    secs = time.time() - t0
    summary = {"pages": n, "seconds": round(secs, 2), "pages_per_second": round(n / max(secs, 1e-9), 2),
               "tasks": dict(tasks), "regions_per_level": {lv: levels.get(lv, 0) for lv in LEVELS},
               "regions_per_kind": dict(kinds), "skipped": skipped, "seed": run.seed, "workers": run.workers}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {**summary, "previews": previews}
