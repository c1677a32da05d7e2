"""Training throughput of the tiny preset: real (non-padding) tokens per second through `train()`, with padded batches
vs sequence packing, on a mixture of short and long samples (text-only and with one image).

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--batch-size 8]

Prints a table with ratios to the padded run. CPU, fp32, one process.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from PIL import Image

from vlmcook.config import MiniCPMVConfig
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.train.data import ListRecords, RecordSource, collate_batch, pack
from vlmcook.train.loop import TrainConfig, train

WORDS = "the a red blue box circle page text line number seven over under left right of and is".split()


def records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 6, 40, 120])))
        if i % 3 == 0:
            img = Image.new("RGB", (rng.randint(20, 60), rng.randint(20, 60)), (rng.randrange(256), 40, 90))
            out.append({"images": [img], "messages": [{"role": "user", "content": "(<image>./</image>)\nDescribe."},
                                                      {"role": "assistant", "content": answer}]})
        else:
            out.append({"messages": [{"role": "user", "content": "Say something."},
                                     {"role": "assistant", "content": answer}]})
    return out


def run(batches: list[dict], steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = MiniCPMV(MiniCPMVConfig.from_name("tiny"))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[:steps])
    cfg = TrainConfig(stage="pt3", steps=steps, lr=1e-3, schedule="constant", log_every=0)
    train(cfg, model, batches[:1], dist=None)  # warm-up (first-call overheads)
    t0 = time.perf_counter()
    train(cfg, model, batches)
    dt = time.perf_counter() - t0
    return tokens / dt, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = Tokenizer.tiny()
    cfg = MiniCPMVConfig.from_name("tiny")
    src = RecordSource(ListRecords(records(args.steps * args.batch_size)), tok, cfg)
    samples = [src[i] for i in range(len(src))]
    groups = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    longest = max(s["input_ids"].shape[1] for s in samples)
    padded = [collate_batch(g, tok.pad_id) for g in groups]
    packed = [pack(g, max_tokens=max(longest, 256), pad_id=tok.pad_id) for g in groups]
    rows = []
    for name, batches in (("padded", padded), ("packed", packed)):
        shape = f"{sum(b['input_ids'].numel() for b in batches) / len(batches):.0f}"
        real = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["input_ids"].numel() for b in batches)
        tps, dt = run(batches, args.steps)
        rows.append((name, shape, real, tps, dt))
    base = rows[0][3]
    print(f"\ntiny preset, {args.steps} steps x {args.batch_size} samples, CPU fp32, {torch.get_num_threads()} threads")
    print(f"{'batches':<8} {'cells/step':>10} {'real %':>7} {'tokens/s':>9} {'time s':>7} {'ratio':>6}")
    for name, shape, real, tps, dt in rows:
        print(f"{name:<8} {shape:>10} {100 * real:>6.0f}% {tps:>9,.0f} {dt:>7.1f} {tps / base:>5.2f}x")


if __name__ == "__main__":
    main()
