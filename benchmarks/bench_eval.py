"""`vlmcook eval` throughput: samples/s at --batch-size 1 vs 8 on the same multiple-choice TSV.

The model: the demo checkpoint (runs/demo/model) when it exists, else a tiny random-weight one built here. The data:
N synthetic rows in the VLMEvalKit TSV layout (a Pillow-drawn 448x336 image each, four options), greedy answers of
at most --max-new-tokens tokens. One loaded model serves every run; each batch size runs `--repeats` times
(alternating, a fresh --out each time). Reported: samples per second of wall time (median run) and of this process's
CPU time (steadier when other jobs share the cores), one torch thread.

    .venv/bin/python benchmarks/bench_eval.py [--n 32] [--repeats 3] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlmcook.eval.backends import Gen, ModelBackend
from vlmcook.eval.run import EvalConfig, run
from vlmcook.infer.api import ChatModel

DEMO = Path("runs/demo/model")


def tiny_model(folder: Path) -> Path:
    from vlmcook.checkpoint import save_model
    from vlmcook.config import MiniCPMVConfig
    from vlmcook.data.tokenizer import Tokenizer
    from vlmcook.model.minicpmv import MiniCPMV

    torch.manual_seed(0)
    save_model(MiniCPMV(MiniCPMVConfig.from_name("tiny")), folder, tokenizer=Tokenizer.tiny())
    return folder


def mcq_tsv(path: Path, n: int) -> Path:
    colours = ["red", "green", "blue", "yellow"]
    rgb = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "image", "question", "A", "B", "C", "D", "answer"])
        for i in range(n):
            img = Image.new("RGB", (448, 336), rgb[i % 4])
            ImageDraw.Draw(img).rectangle((40 + i % 7 * 20, 40, 200, 160), fill=(255, 255, 255))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            w.writerow([i, base64.b64encode(buf.getvalue()).decode(), "What colour is the background?",
                        *colours, "ABCD"[i % 4]])
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = DEMO if (DEMO / "config.json").is_file() else tiny_model(tmp / "model")
        data = mcq_tsv(tmp / "bench.tsv", args.n)
        backend = ModelBackend(ChatModel.load(model), Gen(max_new_tokens=args.max_new_tokens), str(model))
        wall: dict[int, list[float]] = {1: [], 8: []}
        cpu: dict[int, list[float]] = {1: [], 8: []}
        for r in range(args.repeats):
            for b in (1, 8):
                out, c0 = tmp / f"b{b}_{r}", time.process_time()
                run(EvalConfig(task="mcq", data=str(data), out=str(out), model=str(model), batch_size=b,
                               max_new_tokens=args.max_new_tokens), backend=backend, progress=False)
                cpu[b].append(time.process_time() - c0)
                wall[b].append(json.loads((out / "run.json").read_text())["sessions"][0]["wall_s"])
        print(f"model: {model if model == DEMO else 'tiny (random weights, built here)'}; {args.n} samples, "
              f"max {args.max_new_tokens} new tokens, 1 torch thread")
        for b in (1, 8):
            print(f"batch {b}: {args.n / statistics.median(wall[b]):.2f} samples/s wall, "
                  f"{args.n / statistics.median(cpu[b]):.2f} samples/CPU-s (wall s per run: "
                  f"{', '.join(f'{w:.1f}' for w in wall[b])})")
        print(f"batch 8 / batch 1: {statistics.median(wall[1]) / statistics.median(wall[8]):.2f}x wall, "
              f"{statistics.median(cpu[1]) / statistics.median(cpu[8]):.2f}x CPU time")


if __name__ == "__main__":
    main()
