"""RL throughput of the tiny preset: rollout tokens/s (engine, G samples per prompt, temperature 1) at a few batch
sizes, and the GRPO update step time (teacher-forced forward + clipped loss + backward + AdamW) per mini-batch.

    .venv/bin/python benchmarks/bench_rl.py [--tokens 48] [--repeat 1] [--threads 1]

Prints two tables with ratios to the first row. CPU, fp32, one process. A random-init model rarely stops early,
so every row generates about --tokens tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmcook.config import MiniCPMVConfig
from vlmcook.data.processor import Processor
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.infer.engine import Engine
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.rl import grpo
from vlmcook.rl.rollout import ContinuationScorer, Task, make_groups, rollout


def tasks(n: int) -> list[Task]:
    return [Task(f"b{i}", [{"role": "user", "content": f"What is {i} + {2 * i}? Think step by step."}], str(3 * i))
            for i in range(n)]


def bench_rollout(model, tok, prompts: int, G: int, tokens: int, repeat: int) -> tuple[float, int]:
    proc, engine = Processor(tok, model.config), Engine(model, tok)
    best, n = float("inf"), 0
    for r in range(repeat):
        groups = make_groups(tasks(prompts), [True] * prompts, proc)
        t0 = time.perf_counter()
        rollout(engine, groups, G, tokens, seed=r, rows_per_call=prompts * G)
        best = min(best, time.perf_counter() - t0)
        n = sum(len(c.token_ids) for g in groups for c in g.completions)
    return n / best, n


def bench_update(model, tok, rows: int, tokens: int, repeat: int) -> float:
    proc = Processor(tok, model.config)
    prompt = make_groups(tasks(1), [True], proc)[0].prompt
    gen = torch.Generator().manual_seed(0)
    conts = [torch.randint(10, 500, (tokens,), generator=gen).tolist() for _ in range(rows)]
    net = ContinuationScorer(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    adv = torch.randn(rows)
    best = float("inf")
    for _ in range(repeat + 1):  # the first one warms up
        t0 = time.perf_counter()
        logp, mask = net([prompt] * rows, conts, tok.pad_id)
        loss, _ = grpo.clipped_surrogate(logp, logp.detach() + 0.01, adv, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens per sample / update length")
    ap.add_argument("--repeat", type=int, default=1, help="timed repeats (best is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the tiny preset's "
                    "matrices gain nothing from more, and a busy shared machine makes them much slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MiniCPMV(MiniCPMVConfig.from_name("tiny")).eval()
    tok = Tokenizer.tiny()
    print(f"tiny preset, CPU, {torch.get_num_threads()} threads, {args.tokens} new tokens per sample\n")
    print(f"{'rollout (prompts x G)':<24}{'rows':>6}{'tokens':>9}{'tokens/s':>11}{'ratio':>8}")
    base = None
    for prompts, G in ((1, 8), (4, 8), (16, 8)):
        tps, n = bench_rollout(model, tok, prompts, G, args.tokens, args.repeat)
        base = base or tps
        print(f"{f'{prompts} x {G}':<24}{prompts * G:>6}{n:>9}{tps:>11,.0f}{tps / base:>8.2f}")
    print(f"\n{'update (rows per mini-batch)':<30}{'ms/step':>10}{'tokens/s':>11}{'ratio':>8}")
    base = None
    model.train()
    for rows in (8, 16, 32):
        dt = bench_update(model, tok, rows, args.tokens, args.repeat)
        base = base or dt
        print(f"{rows:<30}{dt * 1e3:>10.1f}{rows * args.tokens / dt:>11,.0f}{dt / base:>8.2f}")


if __name__ == "__main__":
    main()
