"""`vlmcook rl`: hybrid short/long GRPO on a JSONL of verifiable prompts.

    vlmcook rl --init runs/sft/step-400 --data prompts.jsonl --out runs/rl --steps 200
    vlmcook rl --config rl.json                      # any flag below as a JSON key (dashes or underscores)
    torchrun --nproc_per_node 8 -m vlmcook.cli rl --dist ddp ...

Prompt JSONL (one object per line), the SFT format without the assistant turn, plus the reference:

    {"id": "geo-3", "images": ["img/3.png"],
     "messages": [{"role": "user", "content": "(<image>./</image>)\\nWhat is the area?"}],
     "answer": "12.5", "verifier": "number", "tolerance": 0.01}

verifier: number (tolerance = absolute) | choice | string | anls | prob (RLPR probability reward) | none.
Flags are generated from the fields of RLConfig (vlmcook/rl/train.py), Start and Prompts, so Python code uses the same
names; flags given on the command line win over the config file, the file over the defaults.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from vlmcook.rl.train import RLConfig, train_rl
from vlmcook.train import common as C
from vlmcook.train import flags
from vlmcook.train.flags import opt

VERIFIER_NAMES = ("number", "choice", "string", "anls", "prob", "none")


@dataclass(frozen=True)
class Prompts:
    """The prompts of `vlmcook rl`."""

    data: str | None = opt(None, "prompt JSONL, one prompt per line as above", required=True, metavar="FILE.jsonl")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("rl", help="hybrid short/long GRPO with verifiable rewards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_flags(p, RLConfig, C.Start, Prompts, default_text={"dist": "default: ddp under torchrun, else none"})
    p.set_defaults(fn=run)
    return p


def load_tasks(path: str | Path) -> list:
    """Prompt JSONL -> [Task]; a bad line raises naming file:line and what is wrong."""
    from vlmcook.rl.rollout import Task
    from vlmcook.train.data import DataError, record_to_messages

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or "answer" not in rec:
            raise ValueError(f"{where}: a prompt record needs 'messages' and 'answer'")
        verifier = rec.get("verifier", "number")
        if verifier not in VERIFIER_NAMES:
            raise ValueError(f"{where}: verifier {verifier!r} is not one of {VERIFIER_NAMES}")
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "user":
            raise ValueError(f"{where}: 'messages' must be a non-empty list ending with a user turn")
        try:  # the SFT parser validates markers / images / videos; it wants a final assistant turn
            messages, images = record_to_messages({**rec, "messages": msgs + [{"role": "assistant", "content": ""}]},
                                                  path.parent, where)
        except DataError as e:
            raise ValueError(str(e)) from None
        tasks.append(Task(str(rec.get("id", f"{path.name}:{n}")), messages[:-1], rec["answer"], verifier,
                          float(rec.get("tolerance", 0.0)), images or None))
    if not tasks:
        raise ValueError(f"--data {path}: no prompts")
    return tasks


def run(args) -> int:
    values = flags.values(args, RLConfig, C.Start, Prompts)
    dist = C.setup_distributed()
    values.setdefault("dist", "ddp" if dist.enabled else "none")
    cfg, prompts, start = (flags.build(cls, values) for cls in (RLConfig, Prompts, C.Start))
    tasks = load_tasks(prompts.data)
    model, tokenizer = C.load_or_init(start.init, start.preset, start.tokenizer, seed=cfg.seed)
    try:
        hist = train_rl(cfg, model, tokenizer, tasks, dist=dist)
    finally:
        C.cleanup_distributed()
    if hist:
        C.print0(f"done: {len(hist)} steps, reward {hist[0]['reward_total']:.3f} -> {hist[-1]['reward_total']:.3f}, "
                 f"{hist[-1]['rl_tokens']:,} RL tokens; checkpoint in {Path(cfg.out_dir) / 'latest'}")
    return 0
