"""`vlmcook data docs`: make parser-free document-learning samples from PDFs, synthetic pages or image+boxes JSONL.

    vlmcook data docs (--pdf DIR | --synthetic N | --jsonl FILE) --out DIR [--levels low,medium,high]
                      [--level-weights 0.4,0.3,0.3] [--seed S] [--workers W] ...
    vlmcook data docs --pdf DIR --out DIR --mode parser     # the parser baseline (parser.py), same SFT format

Writes `DIR/samples.jsonl`, `DIR/images/`, `DIR/summary.json` and `DIR/contact_sheet.png`, prints a summary.
`python -m vlmcook.data.docs.cli` works too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

from vlmcook.data.docs.corrupt import LEVELS, CorruptConfig
from vlmcook.data.docs.samples import TASKS, SampleConfig


def _floats(s: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in s.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated finite numbers")
    return values


def _names(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pdf", metavar="DIR", help="folder of PDFs (searched recursively)")
    src.add_argument("--synthetic", type=int, metavar="N", help="render N synthetic pages")
    src.add_argument("--jsonl", metavar="FILE", help="image + boxes JSONL (see vlmcook/data/docs/jsonl.py)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", choices=("corrupt", "parser"), default="corrupt",
                   help="corrupt: corrupted pages (default); parser: pypdfium2 text + figure crops (needs --pdf; "
                        "the corruption and task flags do not apply)")
    p.add_argument("--levels", type=_names, default=LEVELS, help="corruption levels to use (default: all three)")
    p.add_argument("--level-weights", type=_floats, default=None,
                   help="one weight per level (default 0.4,0.3,0.3 for all three levels, else equal)")
    p.add_argument("--region-fraction", type=float, default=0.5, help="fraction of regions corrupted per page")
    p.add_argument("--corrupt", action="append", default=[], metavar="KEY=VALUE",
                   help="a level strength, e.g. medium_erase=0.2 or low_jpeg=40,90 (fields of CorruptConfig)")
    p.add_argument("--tasks", type=_names, default=TASKS, help="sample tasks: page, regions")
    p.add_argument("--task-weights", type=_floats, default=None, help="one weight per task (default equal)")
    p.add_argument("--unit", choices=("block", "line"), default="block", help="region unit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--dpi", type=float, default=144.0, help="PDF render resolution")
    p.add_argument("--text", metavar="FILE", help="text file for synthetic pages (default: built-in corpus)")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png")
    p.add_argument("--contact", type=int, default=4, help="pages on the contact sheet (0 = none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("docs", help="parser-free document learning data (render / read PDFs, corrupt)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    p.set_defaults(fn=run)
    return p


def _strengths(items: list[str]) -> dict:
    """`--corrupt key=value` pairs -> CorruptConfig overrides, typed like the field's default."""
    defaults = {f.name: getattr(CorruptConfig(), f.name) for f in dataclasses.fields(CorruptConfig)}
    out = {}
    for item in items:
        key, _, val = item.partition("=")
        if key not in defaults or key in ("levels", "weights", "region_fraction") or not val:
            raise ValueError(f"--corrupt {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(set(defaults) - {'levels', 'weights', 'region_fraction'})}")
        d = defaults[key]
        try:
            out[key] = tuple(type(d[0])(v) for v in val.split(",")) if isinstance(d, tuple) else type(d)(val)
        except ValueError:
            raise ValueError(f"--corrupt {item!r}: {val!r} is not like the default {d!r}") from None
    return out


def _configs(args) -> tuple[CorruptConfig, SampleConfig]:
    weights = args.level_weights
    if weights is None:
        weights = (0.4, 0.3, 0.3) if tuple(args.levels) == LEVELS else (1.0,) * len(args.levels)
    task_w = args.task_weights or (1.0,) * len(args.tasks)
    return (CorruptConfig(levels=tuple(args.levels), weights=tuple(weights), region_fraction=args.region_fraction,
                          **_strengths(args.corrupt)),
            SampleConfig(tasks=tuple(args.tasks), task_weights=tuple(task_w), unit=args.unit))


def print_summary(s: dict, out: str, file=None) -> None:
    p = lambda *a: print(*a, file=file or sys.stdout)  # noqa: E731
    p(f"pages written: {s['pages']} in {s['seconds']} s ({s['pages_per_second']} pages/s, {s['workers']} workers)")
    p("samples per task: " + ", ".join(f"{k} {v}" for k, v in sorted(s["tasks"].items())))
    p("corrupted regions per level: " + ", ".join(f"{k} {v}" for k, v in s["regions_per_level"].items()))
    p("regions per kind: " + ", ".join(f"{k} {v}" for k, v in sorted(s["regions_per_kind"].items())))
    p(f"skipped: {len(s['skipped'])}")
    for sk in s["skipped"]:
        p(f"  {sk['where']}: {sk['why']}")
    p(f"output: {out}/samples.jsonl, {out}/images/, {out}/summary.json")


def run(args) -> int:
    from vlmcook.data.docs.contact import contact_sheet
    from vlmcook.data.docs.pdf import PdfConfig
    from vlmcook.data.docs.pipeline import RunConfig, Source
    from vlmcook.data.docs.pipeline import run as run_pipeline
    from vlmcook.data.docs.text import TextSource

    if args.mode == "parser":
        return _run_parser(args)
    try:
        ccfg, scfg = _configs(args)
        if args.synthetic is not None and args.synthetic < 1:
            raise ValueError(f"--synthetic {args.synthetic}: need at least one page")
        source = Source(synthetic=args.synthetic, pdf=args.pdf, jsonl=args.jsonl, pdf_cfg=PdfConfig(dpi=args.dpi),
                        text=TextSource.from_file(args.text) if args.text else None)
        cfg = RunConfig(out=args.out, seed=args.seed, corrupt=ccfg, sample=scfg, image_format=args.image_format,
                        workers=max(1, args.workers), contact=args.contact)
        summary = run_pipeline(source, cfg, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlmcook data docs: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, args.out)
    if summary["previews"]:
        print(f"contact sheet: {contact_sheet(summary['previews'], os.path.join(args.out, 'contact_sheet.png'))}")
    return _nothing_written(summary["pages"], summary["skipped"])


def _run_parser(args) -> int:
    from vlmcook.data.docs.parser import run as run_parser
    from vlmcook.data.docs.pdf import PdfConfig

    try:
        if args.pdf is None:
            raise ValueError("--mode parser reads PDFs: give --pdf DIR")
        s = run_parser(args.pdf, args.out, PdfConfig(dpi=args.dpi))
    except (ValueError, FileNotFoundError) as e:
        print(f"vlmcook data docs: error: {e}", file=sys.stderr)
        return 2
    print(f"pages parsed: {s['pages']} in {s['seconds']} s, figure crops: {s['figures']}, skipped: {len(s['skipped'])}")
    for sk in s["skipped"]:
        print(f"  {sk['where']}: {sk['why']}")
    print(f"output: {args.out}/samples.jsonl, {args.out}/images/, {args.out}/summary.json")
    return _nothing_written(s["pages"], s["skipped"])


def _nothing_written(pages: int, skipped: list) -> int:
    """Exit 2 when every input was skipped (a run that wrote no page is a failure a script must see)."""
    if pages == 0:
        print(f"vlmcook data docs: error: no page written ({len(skipped)} inputs skipped, listed above)",
              file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = configure(argparse.ArgumentParser(prog="vlmcook data docs", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
