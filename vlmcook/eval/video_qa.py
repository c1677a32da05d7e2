"""Video QA evaluation on held-out synthetic videos, and the 3D-vs-2D resampler comparison at an equal token budget.

Notable:
- Items come from `SynthVideoQA` (vlmcook/data/synth_video.py) with a seed the training data never uses; each
  answer needs time (order, count, motion direction, colour at second t), so one frame cannot answer it.
- Baselines that need no model: `chance` (a uniform guess over the task's answer set) and `majority` (always the
  most frequent training answer of the task), so an accuracy can be read against what the question text allows.
- 3D vs 2D: both see `budget` visual tokens = `budget // query_num` packages, sampled uniformly over the whole video
  (`max_visual_tokens` caps the package count, video.plan_frames). 3D packs `packing` frames per package, 2D one
  frame per package, so 2D sees `packing` times fewer frames (metrics.budget_frames). Same model, same videos.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from vlmcook.data.processor import Processor
from vlmcook.data.synth_video import COLOURS, DIRECTIONS, TASKS
from vlmcook.eval.generate import greedy, prompt_of
from vlmcook.eval.metrics import normalize_answer, wilson_interval
from vlmcook.train.data import record_to_messages

ANSWER_SETS = {"order": tuple(COLOURS), "count": tuple(str(k) for k in range(1, 6)), "motion": DIRECTIONS,
               "at_time": tuple(COLOURS)}


@dataclass
class VideoItem:
    id: str
    prompt: dict
    answer: str
    task: str
    frames: int  # frames the model sees
    packages: int


def video_items(source, indices, tokenizer, config, **knobs) -> list[VideoItem]:
    """Prompts for records `indices` of a SynthVideoQA, with the processor's video knobs (fps, packing,
    max_visual_tokens, max_frames) overriding the record's."""
    proc = Processor(tokenizer, config)
    items = []
    for i in indices:
        rec = dict(source.record(i))  # a copy: the source may hand out cached records
        rec["videos"] = [{**rec["videos"][0], **{k: v for k, v in knobs.items() if v is not None}}]
        messages, images = record_to_messages(rec, None, rec["id"])
        prompt = prompt_of(proc, messages, images)
        packages = prompt["temporal_ids"][0]
        items.append(VideoItem(rec["id"], prompt, rec["meta"]["answer"], rec["meta"]["task"],
                               sum(len(p) for p in packages), len(packages)))
    return items


def chance(tasks: list[str]) -> float:
    """Expected accuracy of a uniform guess over each task's answers."""
    return sum(1 / len(ANSWER_SETS[t]) for t in tasks) / len(tasks)


def majority_baseline(train_meta: list[dict], items: list[VideoItem]) -> float:
    """Accuracy of always answering the most frequent training answer of the item's task."""
    best = {}
    for t in TASKS:
        c = Counter(normalize_answer(m["answer"]) for m in train_meta if m["task"] == t)
        best[t] = c.most_common(1)[0][0] if c else ""
    return sum(best[it.task] == normalize_answer(it.answer) for it in items) / len(items)


def eval_video_qa(model, tokenizer, items: list[VideoItem], max_new_tokens: int = 6) -> dict:
    """-> {"accuracy", "ci95", "per_task": {task: acc}, "n", "mean_frames", "mean_packages", "examples"}."""
    if not items:
        raise ValueError("eval_video_qa: no items")
    preds = greedy(model, tokenizer, [it.prompt for it in items], max_new_tokens)
    hits = [normalize_answer(p) == normalize_answer(it.answer) for p, it in zip(preds, items)]
    per_task = {}
    for t in TASKS:
        idx = [k for k, it in enumerate(items) if it.task == t]
        if idx:
            per_task[t] = sum(hits[k] for k in idx) / len(idx)
    k = sum(hits)
    return {"accuracy": k / len(items), "ci95": wilson_interval(k, len(items)), "per_task": per_task,
            "n": len(items), "chance": chance([it.task for it in items]),
            "mean_frames": sum(it.frames for it in items) / len(items),
            "mean_packages": sum(it.packages for it in items) / len(items),
            "examples": [{"task": it.task, "answer": it.answer, "output": p} for it, p in zip(items[:4], preds)],
            "outputs": preds}


def compare_3d_2d(model, tokenizer, config, source, indices, budget: int, packing: int,
                  max_new_tokens: int = 6) -> dict:
    """Video QA accuracy of `packing` frames per package vs one frame per package at `budget` visual tokens."""
    out = {}
    for name, k in (("3d", packing), ("2d", 1)):
        items = video_items(source, indices, tokenizer, config, fps=10.0, packing=k, max_visual_tokens=budget)
        out[name] = eval_video_qa(model, tokenizer, items, max_new_tokens)
        out[name]["packing"] = k
    out["budget"] = budget
    return out
