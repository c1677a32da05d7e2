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
import math
from dataclasses import dataclass
from pathlib import Path

from vlmcook.data.processor import Processor
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


RL_KEYS = ("answer", "verifier", "tolerance")  # a prompt record: the SFT record's keys plus these


def load_tasks(path: str | Path) -> list:
    """Prompt JSONL -> [Task]. The file is read whole before training; its first bad line raises a DataError naming
    file:line and what is wrong (prompts are few and chosen, so a bad one is fixed, not skipped)."""
    from vlmcook.train.data import JsonlRecords

    records = JsonlRecords(path)
    tasks = [_task(*records.record(i), records.path) for i in range(len(records))]
    if not tasks:
        raise ValueError(f"--data {path}: no prompts")
    return tasks


def _task(rec, where: str, path: Path):
    """One prompt record -> Task, or a ValueError (a DataError from the SFT parser) starting with `where`."""
    from vlmcook.rl.rollout import Task
    from vlmcook.train.data import RECORD_KEYS, record_to_messages

    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: {msg}")

    if not isinstance(rec, dict) or "answer" not in rec:
        raise bad("a prompt record needs 'messages' and 'answer'")
    answer, verifier, tol = rec["answer"], rec.get("verifier", "number"), rec.get("tolerance", 0.0)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        answer = str(answer)
    if not (isinstance(answer, str) or isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)):
        raise bad(f"'answer' must be a string, a number or a non-empty list of strings, got {answer!r:.80}")
    if verifier not in VERIFIER_NAMES:
        raise bad(f"verifier {verifier!r} is not one of {VERIFIER_NAMES}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise bad(f"'tolerance' must be a finite number >= 0, got {tol!r:.40}")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "user":
        raise bad("'messages' must be a non-empty list ending with a user turn")
    # the SFT parser validates markers / images / videos; it wants a final assistant turn
    messages, images = record_to_messages({**rec, "messages": msgs + [{"role": "assistant", "content": ""}]},
                                          path.parent, where, keys=RECORD_KEYS + RL_KEYS)
    rid = rec.get("id", f"{path.name}:{where.rpartition(':')[2]}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise bad(f"'id' must be a string or an integer, got {rid!r:.40}")
    return Task(str(rid), messages[:-1], answer, verifier, float(tol), images or None)


def check_tasks(tasks: list, processor, max_length: int) -> None:
    """Each prompt's media readable (headers) and the prompt, in either mode, shorter than the context by at least
    one token: found before training starts, naming the prompt, instead of in the middle of a rollout."""
    for t in tasks:
        for thinking in (False, True):
            try:
                processor.count_tokens(t.messages, t.images, thinking=thinking, max_length=max_length, reserve=1)
            except (ValueError, TypeError, OSError) as e:
                raise ValueError(f"prompt {t.id}: {e}") from None


def run(args) -> int:
    values = flags.values(args, RLConfig, C.Start, Prompts)
    dist = C.setup_distributed()
    values.setdefault("dist", "ddp" if dist.enabled else "none")
    cfg, prompts, start = (flags.build(cls, values) for cls in (RLConfig, Prompts, C.Start))
    tasks = load_tasks(prompts.data)
    model, tokenizer = C.load_or_init(start.init, start.preset, start.tokenizer, seed=cfg.seed)
    check_tasks(tasks, Processor(tokenizer, model.config), model.config.llm.max_position_embeddings)
    try:
        hist = train_rl(cfg, model, tokenizer, tasks, dist=dist)
    finally:
        C.cleanup_distributed()
    if hist:
        C.print0(f"done: {len(hist)} steps, reward {hist[0]['reward_total']:.3f} -> {hist[-1]['reward_total']:.3f}, "
                 f"{hist[-1]['rl_tokens']:,} RL tokens; checkpoint in {Path(cfg.out_dir) / 'latest'}")
    return 0
