"""`vlmcook rl`: hybrid short/long GRPO on a JSONL of verifiable prompts (the lead mounts `add_parser` / `run`).

    vlmcook rl --init runs/sft/latest-step --data prompts.jsonl --out runs/rl --steps 200
    vlmcook rl --config rl.json                      # any flag below as a JSON key (dashes or underscores)
    torchrun --nproc_per_node 8 -m vlmcook.cli rl --dist ddp ...

Prompt JSONL (one object per line), the SFT format without the assistant turn, plus the reference:

    {"id": "geo-3", "images": ["img/3.png"],
     "messages": [{"role": "user", "content": "(<image>./</image>)\\nWhat is the area?"}],
     "answer": "12.5", "verifier": "number", "tolerance": 0.01}

verifier: number (tolerance = absolute) | choice | string | anls | prob (RLPR probability reward) | none.
Flags given on the command line win over the config file; the file wins over the defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VERIFIER_NAMES = ("number", "choice", "string", "anls", "prob", "none")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("rl", help="hybrid short/long GRPO with verifiable rewards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", metavar="FILE.json", help="JSON object of flag values (command-line flags override it)")
    a("--data", metavar="FILE.jsonl", help="prompt JSONL (see above)")
    a("--init", metavar="DIR", help="start from a checkpoint folder (released layout or a step-N)")
    a("--preset", help="start from a random init of a preset (e.g. tiny; for smoke runs)")
    a("--tokenizer", metavar="DIR", help="tokenizer folder (default: --init's, or the built-in tiny one)")
    a("--out", help="output folder: step-N/ checkpoints, `latest`, rl_log.jsonl")
    a("--steps", type=int, help="RL steps (default 100)")
    a("--prompts-per-step", type=int, help="prompts per step over all processes (default 16)")
    a("--group-size", type=int, help="samples per prompt, G (default 8)")
    a("--long-share", type=float, help="share of prompts rolled out in long (thinking) mode (default 0.5)")
    a("--max-new-tokens", type=int, help="max response tokens (default 256)")
    a("--temperature", type=float, help="rollout temperature (default 1.0)")
    a("--lr", type=float, help="constant learning rate (default 1e-6)")
    a("--mini-batches", type=int, help="optimizer steps per rollout batch (default 4)")
    a("--epochs", type=int, help="passes over each rollout batch (default 1)")
    a("--eps-low", type=float, help="lower clip (default 0.2)")
    a("--eps-high", type=float, help="upper clip (default 0.28)")
    a("--kl-coef", type=float, help="k3 KL to the starting policy (default 0 = off)")
    a("--entropy-coef", type=float, help="entropy bonus (default 0 = off)")
    a("--truncation", choices=("keep", "mask"), help="truncated completions: keep (default) or mask from the loss")
    a("--std-filter", action="store_true", default=None, help="RLPR's EMA reward-std prompt filter")
    a("--rm-weight", type=float, help="weight of the group z-scored preference score (default 0.5)")
    a("--stage", choices=("pt1", "pt2", "pt3", "sft"), help="which parameters train (default sft = all)")
    a("--lora", action="store_true", default=None, help="train LoRA adapters on the LLM")
    a("--dist", choices=("none", "ddp"), help="default: ddp under torchrun, none otherwise")
    a("--save-every", type=int, help="checkpoint every N steps (default 0: only at the end)")
    a("--resume", action="store_true", default=None, help="continue from --out/latest if it exists")
    a("--seed", type=int, help="seed (default 0)")
    a("--log-every", type=int, help="print a log line every N steps (default 1)")
    p.set_defaults(fn=run)
    return p


MODEL_KEYS = ("config", "data", "init", "preset", "tokenizer", "out")


def merge_config(args) -> dict:
    """Flags over the JSON config file; returns {dest: value} for every key given somewhere."""
    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {args.config}: not valid JSON ({e})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config}: must hold a JSON object of flag values")
        known = set(vars(args))
        for k, v in loaded.items():
            key = k.replace("-", "_")
            if key not in known or key == "config":
                raise ValueError(f"--config {args.config}: unknown key {k!r}")
            values[key] = v
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("fn", "config")})
    return values


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
    from vlmcook.rl.train import RLConfig, train_rl
    from vlmcook.train import common as C
    from vlmcook.train.cli import _model_and_tokenizer

    values = merge_config(args)
    for need in ("data", "out"):
        if need not in values:
            raise ValueError(f"vlmcook rl: --{need} is required (flag or config key)")
    if ("init" in values) == ("preset" in values):
        raise ValueError("vlmcook rl: give exactly one of --init DIR or --preset NAME")
    dist = C.setup_distributed()
    fields = {k: v for k, v in values.items() if k not in MODEL_KEYS}
    fields.setdefault("dist", "ddp" if dist.enabled else "none")
    cfg = RLConfig(out_dir=values["out"], **fields)
    ns = argparse.Namespace(init=values.get("init"), preset=values.get("preset"), tokenizer=values.get("tokenizer"))
    model, tokenizer = _model_and_tokenizer(ns, cfg.seed)
    tasks = load_tasks(values["data"])
    try:
        hist = train_rl(cfg, model, tokenizer, tasks, dist=dist)
    finally:
        C.cleanup_distributed()
    if hist:
        C.print0(f"done: {len(hist)} steps, reward {hist[0]['reward_total']:.3f} -> {hist[-1]['reward_total']:.3f}, "
                 f"{hist[-1]['rl_tokens']:,} RL tokens; checkpoint in {Path(values['out']) / 'latest'}")
    return 0
