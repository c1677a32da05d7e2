"""The paper's hybrid-RL claim at toy scale: long-only RL vs hybrid (50% long) RL at the same number of steps.

    vlmcook demo --rl [--quick] [--out runs/demo_rl]

1. Task (text, verifiable, thinking helps): "What is a + b + c?" over single digits. Long-mode SFT targets write the
   partial sums (`<think>\\na + b = x\\nx + c = s\\n</think>\\n\\ns`); short-mode targets are just `s`, so short mode
   must add three numbers in one shot, which a tiny model does worse.
2. Brief SFT of both modes (50/50) from scratch on a small model, stopped early on purpose (partial accuracy).
3. From that one checkpoint: long-only RL (long_share 1.0) and hybrid RL (long_share 0.5), same steps, same seeds,
   same prompts; the number verifier gives R_acc.
4. Greedy evaluation of every model in both modes on sums drawn with another seed: accuracy, response length, RL
   tokens used. (Only 1,000 digit triples exist and SFT sees them all: this measures reliability, not
   generalisation.)

Notable: learning rates are from-scratch ones (2e-3 SFT, 1e-4 RL), not the paper's 1e-6 for a pre-trained 8B model.
The report states the numbers as they come out; nothing here is tuned on the comparison.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vlmcook.config import PRESETS, LLMConfig
from vlmcook.data.processor import Processor, collate
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.rl.rollout import Task
from vlmcook.rl.train import RLConfig, evaluate_policy, train_rl


@dataclass(frozen=True)
class RLDemoPlan:
    sft_steps: int = 600
    sft_batch: int = 32
    sft_lr: float = 2e-3
    rl_steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    rl_lr: float = 1e-4
    eval_n: int = 200
    max_new_tokens: int = 32


PLANS = {"full": RLDemoPlan(), "quick": RLDemoPlan(sft_steps=200, rl_steps=10, eval_n=60),
         "smoke": RLDemoPlan(sft_steps=2, sft_batch=4, rl_steps=1, prompts_per_step=2, group_size=2, eval_n=2,
                             max_new_tokens=6)}


def rl_demo_config():
    """Tiny preset with a 128-wide 2-layer LLM (text-only task: the vision side is not used)."""
    tiny = PRESETS["tiny"]
    llm: LLMConfig = replace(tiny.llm, hidden_size=128, intermediate_size=384, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32)
    return replace(tiny, llm=llm, resampler=replace(tiny.resampler, embed_dim=128))


def sum_problem(seed: int, i: int) -> tuple[int, int, int]:
    rng = random.Random(f"rl-demo-sum:{seed}:{i}")
    return rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)


def question(a: int, b: int, c: int) -> str:
    return f"What is {a} + {b} + {c}?"


def sft_messages(a: int, b: int, c: int, long: bool) -> list[dict]:
    s = a + b + c
    answer = f"<think>\n{a} + {b} = {a + b}\n{a + b} + {c} = {s}\n</think>\n\n{s}" if long else str(s)
    return [{"role": "user", "content": question(a, b, c)}, {"role": "assistant", "content": answer}]


def tasks(seed: int, n: int) -> list[Task]:
    out = []
    for i in range(n):
        a, b, c = sum_problem(seed, i)
        out.append(Task(f"sum-{seed}-{i}", [{"role": "user", "content": question(a, b, c)}], str(a + b + c)))
    return out


def sft(model, tok, plan: RLDemoPlan, seed: int) -> list[float]:
    """Both modes, 50/50, cosine-free constant LR (brief on purpose); returns the loss per step."""
    proc = Processor(tok, model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.sft_lr, weight_decay=0.0, betas=(0.9, 0.99))
    model.train()
    losses = []
    for step in range(plan.sft_steps):
        rows = []
        for k in range(plan.sft_batch):
            i = step * plan.sft_batch + k
            msgs = sft_messages(*sum_problem(seed + 1000, i), long=i % 2 == 0)
            rows.append(proc(msgs, add_generation_prompt=False))
        batch = collate(rows, tok.pad_id, padding_side="right")
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def evaluate_both(model, tok, held: list[Task], plan: RLDemoPlan) -> dict:
    return {mode: evaluate_policy(model, tok, held, long=mode == "long", max_new_tokens=plan.max_new_tokens)
            for mode in ("long", "short")}


def run_rl_demo(out: str = "runs/demo_rl", quick: bool = False, seed: int = 0, plan: RLDemoPlan | None = None
                ) -> dict:
    """SFT, then long-only and hybrid RL from the same checkpoint; writes metrics.json, rl_demo.md (the table) and
    rl_demo_curves.png into `out`, prints the table; returns the results."""
    plan = plan or PLANS["quick" if quick else "full"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.tiny()
    torch.manual_seed(seed)
    model = MiniCPMV(rl_demo_config())
    t0 = time.perf_counter()
    sft_losses = sft(model, tok, plan, seed)
    t_sft = time.perf_counter() - t0
    held, train_tasks = tasks(seed + 7, plan.eval_n), tasks(seed, 4000)
    results = {"plan": plan.__dict__, "sft": {"steps": plan.sft_steps, "final_loss": sft_losses[-1],
                                              "seconds": t_sft, "eval": evaluate_both(model, tok, held, plan)}}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for name, share in (("long_only", 1.0), ("hybrid", 0.5)):
        model.load_state_dict(start)
        cfg = RLConfig(steps=plan.rl_steps, prompts_per_step=plan.prompts_per_step, group_size=plan.group_size,
                       long_share=share, max_new_tokens=plan.max_new_tokens, lr=plan.rl_lr, mini_batches=2,
                       seed=seed, log_every=0, out_dir=None)
        t0 = time.perf_counter()
        hist = train_rl(cfg, model, tok, train_tasks)
        results[name] = {"long_share": share, "seconds": time.perf_counter() - t0,
                         "rl_tokens": hist[-1]["rl_tokens"], "history": hist,
                         "eval": evaluate_both(model, tok, held, plan)}
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2, default=float))
    (out_dir / "rl_demo.md").write_text(summary(results))
    _plots(results, out_dir)
    print(summary(results), flush=True)
    return results


def summary(results: dict) -> str:
    """The hybrid-vs-long-only table (markdown): greedy accuracy and mean response length per mode, RL tokens."""
    lines = ["| model | long acc | long len | short acc | short len | RL tokens | RL tokens vs long-only |",
             "|---|---|---|---|---|---|---|"]
    ref = results["long_only"]["rl_tokens"]
    for name in ("sft", "long_only", "hybrid"):
        e, toks = results[name]["eval"], results[name].get("rl_tokens")
        share = f"{toks / ref:.1%}" if toks else "-"
        lines.append(f"| {name} | {e['long']['acc']:.3f} | {e['long']['len']:.1f} | {e['short']['acc']:.3f} | "
                     f"{e['short']['len']:.1f} | {toks or '-'} | {share} |")
    return "\n".join(lines) + "\n"


def _plots(results: dict, out_dir: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (the `report` extra)
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in ("long_only", "hybrid"):
        h = results[name]["history"]
        steps = [m["step"] for m in h]
        axes[0].plot(steps, [m["reward_total"] for m in h], label=name)
        axes[1].plot(steps, [m["acc_long"] for m in h], label=f"{name} long")
        if any(m["n_short"] for m in h):
            axes[1].plot(steps, [m["acc_short"] for m in h], "--", label=f"{name} short")
        axes[2].plot(steps, [m["rl_tokens"] for m in h], label=name)
    for ax, title in zip(axes, ("mean reward R (rollouts)", "rollout accuracy per mode", "RL tokens (cumulative)")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "rl_demo_curves.png", dpi=110)
    plt.close(fig)
