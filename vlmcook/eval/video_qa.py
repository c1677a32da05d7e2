"""Video QA evaluation on held-out synthetic videos, and 3D vs 2D packages at an equal visual-token budget.

Notable:
- Items come from `SynthVideoQA` (vlmcook/data/synth_video.py) with a seed the training data never uses; each
  answer needs time (order, count, motion direction, colour at second t), so one frame cannot answer it.
- Baselines that need no model: `chance` (a uniform guess over the task's answer set) and `majority` (always the
  most frequent training answer of the task), so an accuracy can be read against what the question text allows.
- Equal budget (`packing_sweep`): one package per second of video for every packing k (fps = k), capped at the
  same packages per video, so every k spends the same visual tokens and k = 1 (2D) sees k times fewer frames.
  Differences are paired on the same questions (`paired_difference`).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

from vlmcook.data.processor import Processor
from vlmcook.data.synth_video import COLOURS, DIRECTIONS, TASKS
from vlmcook.eval.generate import LazyPrompt, greedy, prompt_of
from vlmcook.eval.metrics import normalize_answer, wilson_interval
from vlmcook.train.data import record_to_messages

ANSWER_SETS = {"order": tuple(COLOURS), "count": tuple(str(k) for k in range(1, 6)), "motion": DIRECTIONS,
               "at_time": tuple(COLOURS)}


@dataclass
class VideoItem:
    id: str
    prompt: LazyPrompt  # processed when its batch is decoded
    answer: str
    task: str
    frames: int  # frames the model sees
    packages: int
    thinking: bool = False  # long mode: the answer is what follows the think block


def video_items(source, indices, tokenizer, config, thinking: bool = False, **knobs) -> list[VideoItem]:
    """Prompts for records `indices` of a SynthVideoQA, with the processor's video knobs (fps, packing,
    max_visual_tokens, max_frames) overriding the record's; `thinking`: long-mode prompts."""
    proc = Processor(tokenizer, config)
    items = []
    for i in indices:
        rec = dict(source.record(i))  # a copy: the source may hand out cached records
        rec["videos"] = [{**rec["videos"][0], **{k: v for k, v in knobs.items() if v is not None}}]
        messages, images = record_to_messages(rec, None, rec["id"])
        count = proc.count_tokens(messages[:-1], images, thinking=thinking)  # headers only: the video is probed
        prompt = LazyPrompt(count.total, functools.partial(prompt_of, proc, messages, images, thinking))
        items.append(VideoItem(rec["id"], prompt, rec["meta"]["answer"], rec["meta"]["task"], count.views,
                               count.packages, thinking))
    return items


def chance(tasks: list[str]) -> float:
    """Expected accuracy of a uniform guess over each task's answers."""
    return sum(1 / len(ANSWER_SETS[t]) for t in tasks) / len(tasks)


def baselines(train_meta: list[dict], items: list[VideoItem]) -> dict:
    """What no video is needed for, overall and per task: `chance` (a uniform guess over the task's answers) and
    `majority` (always the task's most frequent training answer: what the question text alone allows)."""
    best = {}
    for t in TASKS:
        c = Counter(normalize_answer(m["answer"]) for m in train_meta if m["task"] == t)
        best[t] = c.most_common(1)[0][0] if c else ""
    hit = [best[it.task] == normalize_answer(it.answer) for it in items]
    per_task = {t: {"chance": 1 / len(ANSWER_SETS[t]),
                    "majority": sum(h for h, it in zip(hit, items) if it.task == t) / sum(it.task == t for it in items)}
                for t in TASKS if any(it.task == t for it in items)}
    return {"chance": chance([it.task for it in items]), "majority": sum(hit) / len(items), "per_task": per_task}


def eval_video_qa(model, tokenizer, items: list[VideoItem], max_new_tokens: int | None = None) -> dict:
    """-> {"accuracy", "ci95", "per_task": {task: acc}, "n", "mean_frames", "mean_packages", "examples"}. Long-mode
    items are scored on what follows their think block (no block closed: no answer)."""
    from vlmcook.infer.api import split_output

    if not items:
        raise ValueError("eval_video_qa: no items")
    long = any(it.thinking for it in items)
    texts = greedy(model, tokenizer, [it.prompt for it in items], max_new_tokens or (256 if long else 6))
    preds = [split_output(t, True)[1] if it.thinking else t for t, it in zip(texts, items)]
    hits = [normalize_answer(p) == normalize_answer(it.answer) for p, it in zip(preds, items)]
    per_task, per_task_ci95 = {}, {}
    for t in TASKS:
        idx = [k for k, it in enumerate(items) if it.task == t]
        if idx:
            per_task[t] = sum(hits[k] for k in idx) / len(idx)
            per_task_ci95[t] = wilson_interval(sum(hits[k] for k in idx), len(idx))
    k = sum(hits)
    return {"accuracy": k / len(items), "ci95": wilson_interval(k, len(items)), "per_task": per_task,
            "per_task_ci95": per_task_ci95,
            "n": len(items), "chance": chance([it.task for it in items]),
            "mean_frames": sum(it.frames for it in items) / len(items),
            "mean_packages": sum(it.packages for it in items) / len(items),
            "examples": [{"task": it.task, "answer": it.answer, "output": p} for it, p in zip(items[:4], preds)],
            "outputs": texts, "hits": hits, "tasks": [it.task for it in items]}


def packing_sweep(model, tokenizer, config, source, indices, packings=(1, 2, 3, 4, 6),
                  max_new_tokens: int | None = None, thinking: bool = False) -> dict:
    """Video QA at one package per second for each packing k (fps = k), every k capped at the packages packing 1
    gets on that video (`max_visual_tokens`: rounding can give k > 1 one package more), so each video costs every k
    exactly the same visual tokens and k = 1 (2D) sees k times fewer frames. -> {k: eval_video_qa result}."""
    indices, out = list(indices), {}
    flat = video_items(source, indices, tokenizer, config, thinking, fps=1.0, packing=1)
    for k in packings:
        items = flat if k == 1 else [
            video_items(source, [i], tokenizer, config, thinking, fps=float(k), packing=k,
                        max_visual_tokens=it.packages * config.query_num)[0] for i, it in zip(indices, flat)]
        out[k] = eval_video_qa(model, tokenizer, items, max_new_tokens)
        out[k]["packing"] = k
    return out


def paired_difference(hits_a: list[bool], hits_b: list[bool], z: float = 1.96) -> dict:
    """Accuracy of a minus accuracy of b on the same questions, with the normal-approximation 95% interval of the
    mean per-question difference (each d_i in {-1, 0, 1}; paired, so question difficulty cancels)."""
    if len(hits_a) != len(hits_b) or not hits_a:
        raise ValueError(f"paired_difference: {len(hits_a)} vs {len(hits_b)} answers")
    d = [int(a) - int(b) for a, b in zip(hits_a, hits_b)]
    n, mean = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return {"diff": mean, "ci95": (mean - half, mean + half), "n": n}
