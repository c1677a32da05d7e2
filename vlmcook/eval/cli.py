"""`vlmcook eval`: standard benchmarks from their published files, scored by their official rules, on the model
or on any OpenAI-compatible endpoint; `--compare` puts several runs side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmcook.eval.tasks import TASK_NAMES

EXAMPLES = """tasks (docs/eval.md: file layouts, where to get them, how each score is computed):
  mcq       VLMEvalKit multiple-choice TSV: MMStar, AI2D, SEED-Bench, ScienceQA, ...   accuracy
  mmbench   MMBench TSV with its circular copies                                        circular accuracy
  mmmu      MMMU_DEV_VAL TSV (open questions as VLMEvalKit reformulates them)           accuracy
  ocrbench  OCRBench TSV                                                                score out of 1000
  docvqa / infovqa   VLMEvalKit TSV                                                     ANLS
  textvqa   VLMEvalKit TSV (ten human answers per question)                             VQA accuracy
  videomme  Video-MME question file (parquet / JSON) + a folder of videos               accuracy by duration
  jsonl     your SFT-format JSONL + a verifier (number, choice, string, anls, cer)

examples:
  vlmcook eval --task mmbench --data MMBench_DEV_EN.tsv --model MiniCPM-V-4_5/ --out runs/eval/mmbench
  vlmcook eval --task ocrbench --data OCRBench.tsv --endpoint http://localhost:8000 --batch-size 8 --out runs/eval/ocr
  vlmcook eval --task videomme --data Video-MME/ --model MiniCPM-V-4_5/ --video-packing 1 --out runs/eval/vmme_p1
  vlmcook eval --task videomme --data Video-MME/ --model MiniCPM-V-4_5/ --video-packing 6 --out runs/eval/vmme_p6
  vlmcook eval --compare runs/eval/vmme_p1 runs/eval/vmme_p6
  vlmcook eval --task jsonl --data runs/demo/data/docs_eval/samples.jsonl --verifier cer --out runs/eval/docs

Rerun the same command to resume: samples already answered in --out/predictions.jsonl are skipped."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from vlmcook.cli import _add_model_args

    p = subparsers.add_parser("eval", help="standard benchmarks (MMBench, OCRBench, DocVQA, Video-MME, ...) with "
                                           "their official scoring, on the model or an endpoint",
                              description=__doc__.split(" The lead")[0], epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", choices=TASK_NAMES, metavar="NAME", help=f"one of {', '.join(TASK_NAMES)}")
    a("--data", metavar="FILE_OR_DIR", help="the benchmark's file (TSV, parquet, JSON, JSONL) or folder")
    a("--out", metavar="DIR", help="predictions.jsonl, scores.json, report.md go here (rerun to resume)")
    _add_model_args(p)
    a("--endpoint", metavar="URL", help="an OpenAI-compatible server instead of --model (http://host:port[/v1])")
    a("--endpoint-model", metavar="NAME", help="the model id to request (default: the first of /v1/models)")
    a("--send-paths", action="store_true", help="send media as file:// paths instead of data URLs (the server "
                                                 "must see this filesystem, e.g. vlmcook serve --allowed-media-dir)")
    a("--media-dir", metavar="DIR", help="folder of image_path files / videos (default: beside --data; videomme: "
                                         "its data/ or videos/ folder)")
    a("--limit", type=int, metavar="N", help="the first N samples (MMBench: questions, with all their copies)")
    a("--batch-size", type=int, default=1, metavar="B", help="samples per batch (model) or concurrent requests "
                                                             "(endpoint); default 1")
    a("--thinking", action=argparse.BooleanOptionalAction, default=False, help="long thinking mode (default off)")
    a("--max-new-tokens", type=int, metavar="N", help="default: the task's (short answers); 2048 with --thinking")
    a("--temperature", type=float, default=0.0, metavar="T", help="default 0 (greedy)")
    a("--seed", type=int, default=0, metavar="S", help="sample k gets seed S + k (default 0)")
    a("--video-fps", type=float, metavar="F", help="video sampling rate")
    a("--video-max-frames", type=int, metavar="N", help="at most N frames per video")
    a("--video-packing", type=int, metavar="N", help="frames per resampler package, 1..6 (3D resampler)")
    a("--video-max-visual-tokens", type=int, metavar="N", help="video token budget")
    a("--verifier", metavar="NAME", help="jsonl: the verifier of records without one (default string)")
    a("--compare", nargs="+", metavar="DIR", help="print a table of finished runs instead of evaluating "
                                                   "(with --out: also written to DIR/compare.md)")
    p.set_defaults(fn=run_cli)
    return p


def run_cli(args) -> int:
    from vlmcook.eval.run import EvalConfig, compare, run

    if args.compare:
        table = compare(args.compare)
        print(table, end="")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "compare.md").write_text(table, encoding="utf-8")
        return 0
    missing = [f"--{k}" for k in ("task", "data", "out") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --compare DIR DIR ...)")
    cfg = EvalConfig(**{k: getattr(args, k) for k in EvalConfig.__dataclass_fields__})
    try:
        s = run(cfg)
    except ConnectionError as e:  # an endpoint that cannot be reached: a one-line error, the run resumes later
        raise ValueError(str(e)) from None
    overall = s["overall"] if s["overall"] is None or isinstance(s["overall"], int) else round(s["overall"], 2)
    print(f"{s['task']}: {s['metric']} {overall} over {s['n']} ({s['errors']} errors); {args.out}/report.md")
    return 0
