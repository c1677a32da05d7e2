"""Training throughput on the `tiny` preset with and without sequence packing (forward + backward + AdamW step).

The same samples go through both paths once: right-padded batches of `--batch` samples in data order, versus rows
packed first-fit to `--max-tokens` (vlmcook.train.data.pack) with `--rows` rows per step. Throughput counts real
(non-padding) tokens only. Samples are text-only token sequences with assistant labels on their last third, with a
length mix shaped like an SFT mixture (short text QA, image QA with visual tokens, long document / video samples);
visual inputs cost the same in both paths, so leaving them out isolates what padding wastes.

    .venv/bin/python benchmarks/bench_packing.py [--samples 96] [--batch 8] [--max-tokens 1024] [--rows 2]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from vlmcook.config import MiniCPMVConfig
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.train.data import collate_batch, pack

MIX = [  # (weight, min length, max length): text QA, image QA (1-4 views x 8 queries + text), documents / video
    (0.55, 24, 120), (0.30, 120, 400), (0.15, 400, 1000)]


def make_samples(n: int, seed: int, vocab: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        _, lo, hi = rng.choices(MIX, weights=[m[0] for m in MIX])[0]
        T = rng.randint(lo, hi)
        ids = torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        labels = ids.clone()
        labels[:, : T - T // 3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones(1, T, dtype=torch.long), "labels": labels,
                    "pixel_values": [[]], "temporal_ids": [[]], "image_bound": [torch.zeros(0, 2, dtype=torch.long)]})
    return out


def step(model, opt, batch: dict, keys: tuple[str, ...]) -> None:
    loss = model(**{k: batch[k] for k in keys}).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_interleaved(paths: list[tuple[list[dict], tuple[str, ...]]], cfg) -> list[float]:
    """Seconds per path; the paths take turns step by step (each with its own model and optimizer), so load from
    other processes on a shared machine hits both alike."""
    runs = []
    for batches, keys in paths:
        torch.manual_seed(0)
        model = MiniCPMV(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step(model, opt, batches[0], keys)  # warm-up (allocator, first-call overheads)
        runs.append((model, opt, batches, keys))
    secs = [0.0] * len(runs)
    for k in range(max(len(r[2]) for r in runs)):
        for p, (model, opt, batches, keys) in enumerate(runs):
            if k < len(batches):
                t = time.perf_counter()
                step(model, opt, batches[k], keys)
                secs[p] += time.perf_counter() - t
    return secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MiniCPMVConfig.from_name("tiny")
    samples = make_samples(args.samples, 0, cfg.llm.vocab_size)
    real = sum(s["input_ids"].shape[1] for s in samples)
    padded = [collate_batch(samples[i:i + args.batch], pad_id=0) for i in range(0, len(samples), args.batch)]
    packed_all = pack(samples, args.max_tokens)
    packed = []
    for r in range(0, len(packed_all["rows"]), args.rows):
        sl = slice(r, r + args.rows)
        packed.append({k: packed_all[k][sl] for k in ("input_ids", "labels", "segment_ids", "position_ids",
                                                      "pixel_values", "temporal_ids", "image_bound")})
    plain_keys = ("input_ids", "attention_mask", "labels", "pixel_values", "temporal_ids", "image_bound")
    packed_keys = ("input_ids", "labels", "segment_ids", "position_ids", "pixel_values", "temporal_ids",
                   "image_bound")
    paths = [("padded", padded, plain_keys), ("packed", packed, packed_keys)]
    secs = run_interleaved([(b, k) for _, b, k in paths], cfg)
    results = [(name, len(b), sum(x["input_ids"].numel() for x in b), t) for (name, b, _), t in zip(paths, secs)]
    print(f"tiny preset, {len(samples)} samples, {real} real tokens, length mix {MIX}, {args.threads} threads")
    print(f"{'path':8} {'steps':>5} {'slots':>8} {'pad %':>6} {'seconds':>8} {'real tok/s':>11} {'ratio':>6}")
    base = real / results[0][3]
    for name, n, slots, secs in results:
        print(f"{name:8} {n:5d} {slots:8d} {100 * (1 - real / slots):6.1f} {secs:8.2f} {real / secs:11.0f} "
              f"{real / secs / base:6.2f}")


if __name__ == "__main__":
    main()
