"""The `vlmcook eval` runner: a task's samples -> a backend's answers, batch by batch -> predictions.jsonl,
scores.json and report.md in --out; `compare` prints several runs side by side.

Notable:
- Resumable: each batch is appended to predictions.jsonl as it finishes; a rerun with the same --out skips every
  sample answered there and retries the ones that errored (a video downloaded since, a server back up). run.json
  pins the settings that change predictions; a rerun with other settings is refused (use another --out); --limit
  may grow between reruns. At the end predictions.jsonl is rewritten in the task's order, one line per sample.
- A sample that cannot be asked (bad row, missing file) or whose generation fails is a line with `error` set,
  counted in scores.json `errors` and kept in the denominator (it scores 0; each task states its denominator).
- Efficiency: per sample visual / prompt / generated tokens and preprocess / prefill / decode seconds (in a batch,
  prefill and preprocess are the batch's, decode runs until that row stopped); per run the wall time of each
  session (a resumed run has several), samples/s and peak memory; batch totals count each batch's preprocess and
  prefill once and its longest decode.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from vlmcook.eval.backends import EndpointBackend, Gen, ModelBackend, Output
from vlmcook.eval.tasks import SampleError, make_task
from vlmcook.infer.api import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL_DIR

KNOBS = {"video_fps": "fps", "video_max_frames": "max_frames", "video_packing": "packing",
         "video_max_visual_tokens": "max_visual_tokens"}
PINNED = ("task", "data", "backend", "thinking", *KNOBS, "max_new_tokens", "seed", "temperature", "verifier",
          "media_dir")  # settings that change predictions: a rerun into the same --out must repeat them


@dataclass(frozen=True)
class EvalConfig:
    task: str
    data: str
    out: str
    model: str | None = None  # default: the demo checkpoint (runs/demo/model)
    endpoint: str | None = None
    endpoint_model: str | None = None
    send_paths: bool = False
    limit: int | None = None
    batch_size: int = 1
    thinking: bool = False
    video_fps: float | None = None
    video_max_frames: int | None = None
    video_packing: int | None = None
    video_max_visual_tokens: int | None = None
    max_new_tokens: int | None = None  # default: the task's (short answers), 2048 with thinking
    seed: int = 0
    temperature: float = 0.0
    media_dir: str | None = None
    verifier: str | None = None
    dtype: str | None = None
    device: str | None = None

    def knobs(self) -> dict:
        return {name: getattr(self, f) for f, name in KNOBS.items() if getattr(self, f) is not None}


def run(cfg: EvalConfig, backend=None, progress: bool = True) -> dict:
    """Evaluate (or resume), then write scores.json and report.md; returns the scores dict."""
    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ValueError("--batch-size and --limit must be >= 1")
    if cfg.model and cfg.endpoint:
        raise ValueError("give --model DIR or --endpoint URL, not both")
    task, data = make_task(cfg.task, cfg.verifier), Path(cfg.data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    items = task.load(data, Path(cfg.media_dir) if cfg.media_dir else None)
    items = task.limit(items, cfg.limit) if cfg.limit else items
    if not items:
        raise ValueError(f"--data {data}: no samples")
    max_new = cfg.max_new_tokens or (DEFAULT_MAX_NEW_TOKENS if cfg.thinking else task.max_new_tokens)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, data, max_new)
    sessions = _pin(out / "run.json", settings)
    pred_path = out / "predictions.jsonl"
    done = read_predictions(pred_path)
    todo = [it for it in items if it.id not in done or done[it.id].get("error") is not None]
    if todo:
        backend = backend or make_backend(cfg, max_new)
        _write_json(out / "run.json", {"settings": settings, "sessions": sessions})  # pinned before predictions
        sessions.append(_session(task, backend, todo, items, done, pred_path, cfg, len(sessions), progress))
        _write_json(out / "run.json", {"settings": settings, "sessions": sessions})
    ids = {it.id for it in items}
    records = [done[it.id] for it in items]
    _rewrite(pred_path, records + [r for k, r in done.items() if k not in ids])
    scores = {"task": task.name, "data": settings["data"], **task.aggregate(records),
              "efficiency": efficiency(records, sessions), "settings": settings}
    _write_json(out / "scores.json", scores)
    (out / "report.md").write_text(report(scores), encoding="utf-8")
    return scores


def make_backend(cfg: EvalConfig, max_new_tokens: int):
    gen = Gen(cfg.thinking, max_new_tokens, cfg.temperature, cfg.knobs())
    if cfg.endpoint:
        return EndpointBackend(cfg.endpoint, gen, cfg.endpoint_model, cfg.send_paths)
    from vlmcook.infer.api import ChatModel

    folder = cfg.model or DEFAULT_MODEL_DIR
    return ModelBackend(ChatModel.load(folder, dtype=cfg.dtype, device=cfg.device), gen, str(folder))


def _settings(cfg: EvalConfig, data: Path, max_new: int) -> dict:
    backend = (f"endpoint {cfg.endpoint}" + (f" ({cfg.endpoint_model})" if cfg.endpoint_model else "")
               if cfg.endpoint else f"model {Path(cfg.model or DEFAULT_MODEL_DIR).resolve()}")
    s = {**asdict(cfg), "data": str(data.resolve()), "backend": backend, "max_new_tokens": max_new}
    s["media_dir"] = str(Path(cfg.media_dir).resolve()) if cfg.media_dir else None
    return {k: s[k] for k in (*PINNED, "limit", "batch_size")}


def _pin(path: Path, settings: dict) -> list[dict]:
    """The sessions so far; refuses a folder that holds a run with other prediction-changing settings."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text(encoding="utf-8"))
    diff = [f"{k}: {old['settings'].get(k)!r} there, {settings[k]!r} now" for k in PINNED
            if old["settings"].get(k) != settings[k]]
    if diff:
        raise ValueError(f"--out {path.parent} holds a run with other settings ({'; '.join(diff)}); use another "
                         f"--out (or delete that folder)")
    return old.get("sessions", [])


def _session(task, backend, todo, items, done, pred_path, cfg, number, progress) -> dict:
    from tqdm import tqdm

    seeds = {it.id: cfg.seed + k for k, it in enumerate(items)}  # a pure function of the sample's position
    t0, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(pred_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=f"eval {task.name}",
                                                          unit="sample", disable=not progress) as bar:
        for b in range(0, len(todo), cfg.batch_size):
            batch = todo[b:b + cfg.batch_size]
            for rec in run_batch(task, backend, batch, seeds, f"{number}-{b // cfg.batch_size}"):
                f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                done[rec["id"]] = rec
            f.flush()
            bar.update(len(batch))
    return {"started": started, "samples": len(todo), "wall_s": round(time.perf_counter() - t0, 3),
            "batch_size": cfg.batch_size, "backend": backend.describe, "video_knobs": backend.knobs_note,
            "memory": backend.memory()}


def run_batch(task, backend, batch, seeds: dict, batch_id: str) -> list[dict]:
    """One batch -> one record per sample (errors included)."""
    recs, asks = [], []
    for it in batch:
        rec = {"id": it.id, "prompt": None, "output": None, "extracted": None, "score": 0.0, **it.meta,
               "error": it.error, "error_stage": "data" if it.error else None}
        if it.error is None:
            try:
                msgs = task.messages(it)
                rec["prompt"] = summarize(msgs)
                asks.append((rec, it, msgs))
            except SampleError as e:
                rec.update(error=f"{it.id}: {e}", error_stage="data")
        recs.append(rec)
    outs = backend.generate([(m, seeds[it.id]) for _, it, m in asks]) if asks else []
    for (rec, it, _), o in zip(asks, outs):
        rec.update(_accounting(o, batch_id))
        if o.error is not None:
            rec.update(error=f"{it.id}: {o.error}", error_stage="generate")
            continue
        rec.update(output=o.answer, reasoning=o.reasoning or None, finish_reason=o.finish_reason)
        try:
            rec.update(task.score(it, o.answer))
        except ValueError as e:  # a verifier that cannot read this reference
            rec.update(error=f"{it.id}: scoring: {e}", error_stage="data")
    return recs


def _accounting(o: Output, batch_id: str) -> dict:
    return {"usage": {"prompt_tokens": o.prompt_tokens, "visual_tokens": o.visual_tokens,
                      "generated_tokens": o.completion_tokens},
            "seconds": {"preprocess": o.preprocess_s, "prefill": o.prefill_s, "decode": o.decode_s},
            "batch": batch_id}


def summarize(messages: list[dict], width: int = 240) -> str:
    """The prompt's text with media as <image> / <video name>, whitespace squashed, cut to `width`."""
    parts = []
    for m in messages:
        for it in [m["content"]] if isinstance(m["content"], str) else m["content"]:
            if isinstance(it, str):
                parts.append(it)
            elif it.get("type") == "text":
                parts.append(it["text"])
            else:
                src = it.get(it.get("type"))
                parts.append(f"<{it.get('type')}{' ' + Path(src).name if isinstance(src, str) else ''}>")
    s = " ".join(" ".join(parts).split())
    return s if len(s) <= width else s[:width - 3] + "..."


# ---- files ----------------------------------------------------------------------------------------------------------
def read_predictions(path: Path) -> dict[str, dict]:
    """id -> latest record; a torn last line (an interrupted write) is ignored."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                done[str(rec["id"])] = rec
    return done


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


# ---- efficiency ------------------------------------------------------------------------------------------------------
def _stat(values: list) -> dict:
    vals = [v for v in values if v is not None]
    return {"total": sum(vals), "mean": sum(vals) / len(vals)} if vals else {"total": None, "mean": None}


def efficiency(records: list[dict], sessions: list[dict]) -> dict:
    ok = [r for r in records if r.get("error") is None and r.get("usage")]
    batches = defaultdict(list)
    for r in ok:
        batches[r["batch"]].append(r["seconds"])
    per_batch = {k: sum(max((s[k] or 0.0) for s in rows) for rows in batches.values())
                 for k in ("preprocess", "prefill", "decode")}
    wall = sum(s["wall_s"] for s in sessions)
    memory: dict = {}
    for s in sessions:
        for k, v in s.get("memory", {}).items():
            memory[k] = max(memory[k], v) if isinstance(v, (int, float)) and k in memory else v
    return {"samples_generated": len(ok),
            **{f"{k}_tokens": _stat([r["usage"][f"{k}_tokens"] for r in ok]) for k in ("visual", "prompt",
                                                                                      "generated")},
            **{f"{k}_s": {**_stat([r["seconds"][k] for r in ok]), "batch_total": per_batch[k]}
               for k in ("preprocess", "prefill", "decode")},
            "wall_s": wall, "samples_per_s": sum(s["samples"] for s in sessions) / wall if wall else None,
            "peak_memory": memory, "sessions": len(sessions)}


# ---- report -------------------------------------------------------------------------------------------------------
def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _memory(mem: dict) -> str:
    if "cuda_peak_allocated_mb" in mem:
        return f"{mem['cuda_peak_allocated_mb'] / 1024:.2f} GB CUDA"
    if "cpu_peak_rss_mb" in mem:
        return f"{mem['cpu_peak_rss_mb'] / 1024:.2f} GB RSS"
    return "n/a (endpoint)"


def _groups(by: dict) -> list[str]:
    lines = []
    for key, values in by.items():
        lines += ["", f"### by {key}", "", f"| {key} | score | n |", "|---|---|---|"]
        lines += [f"| {v} | {_fmt(g['score'])} | {g['n']} |" for v, g in values.items()]
    return lines


def report(scores: dict) -> str:
    s, e = scores["settings"], scores["efficiency"]
    knobs = ", ".join(f"{k} {s[k]}" for k in KNOBS if s.get(k) is not None) or "defaults"
    lines = [f"# vlmcook eval: {scores['task']}", "",
             f"- data: `{s['data']}`", f"- backend: {s['backend']}",
             f"- thinking {'on' if s['thinking'] else 'off'}, max new tokens {s['max_new_tokens']}, temperature "
             f"{s['temperature']}, seed {s['seed']}, video knobs: {knobs}", "", "## Scores", ""]
    if scores.get("by_verifier"):
        for v, sub in scores["by_verifier"].items():
            lines += [f"- {v}: {sub['metric']} **{_fmt(sub['overall'])}** over {sub['n']} samples "
                      f"({sub['errors']} errors)"]
    else:
        lines += [f"{scores['metric']}: **{_fmt(scores['overall'])}** over {scores['n']} "
                  f"{'questions' if 'rows' in scores else 'samples'} (denominator: all of them; {scores['errors']} "
                  f"with errors count as wrong)."]
        if "answered_n" in scores:
            lines += ["", f"Over the {scores['answered_n']} questions with an extracted letter only (the official "
                          f"Video-MME script's denominator): {_fmt(scores['answered_overall'])}."]
        lines += _groups(scores.get("by", {}))
    lines += ["", "## Efficiency", "",
              "| samples generated | wall s | samples/s | visual tok/sample | prompt tok/sample "
              "| generated tok/sample | prefill s (batches) | decode s (batches) | peak memory |",
              "|---|---|---|---|---|---|---|---|---|",
              f"| {e['samples_generated']} | {_fmt(e['wall_s'], 1)} | {_fmt(e['samples_per_s'], 3)} | "
              f"{_fmt(e['visual_tokens']['mean'], 1)} | {_fmt(e['prompt_tokens']['mean'], 1)} | "
              f"{_fmt(e['generated_tokens']['mean'], 1)} | {_fmt(e['prefill_s']['batch_total'], 3)} | "
              f"{_fmt(e['decode_s']['batch_total'], 3)} | {_memory(e['peak_memory'])} |"]
    return "\n".join(lines) + "\n"


def compare(dirs: list[str]) -> str:
    """A markdown table of several runs (e.g. the same Video-MME files at packing 1 and 6)."""
    rows, base = [], None
    for d in dirs:
        path = Path(d) / "scores.json"
        if not path.is_file():
            raise FileNotFoundError(f"--compare {d}: no scores.json (run `vlmcook eval ... --out {d}` first)")
        sc = json.loads(path.read_text(encoding="utf-8"))
        s, e = sc["settings"], sc["efficiency"]
        mem = e["peak_memory"]
        mem_v = mem.get("cuda_peak_allocated_mb", mem.get("cpu_peak_rss_mb"))
        base = base or (e["wall_s"], mem_v)
        knobs = " ".join(f"{KNOBS[k]}={s[k]}" for k in KNOBS if s.get(k) is not None) or "-"
        rel_wall = e["wall_s"] / base[0] if base[0] else None
        rel_mem = mem_v / base[1] if mem_v and base[1] else None
        rows.append(f"| {d} | {sc['task']} | {s['backend']} | {knobs} | {sc['n']} | {sc['errors']} | "
                    f"{_fmt(sc['overall'])} | {_fmt(e['visual_tokens']['mean'], 1)} | "
                    f"{_fmt(e['prompt_tokens']['mean'], 1)} | {_fmt(e['prefill_s']['batch_total'], 1)} | "
                    f"{_fmt(e['decode_s']['batch_total'], 1)} | {_fmt(e['wall_s'], 1)} ({_fmt(rel_wall)}x) | "
                    f"{_memory(mem)} ({_fmt(rel_mem)}x) |")
    head = ("| run | task | backend | video knobs | n | errors | score | visual tok/sample | prompt tok/sample | "
            "prefill s | decode s | wall s (vs first) | peak memory (vs first) |")
    return "\n".join([head, "|" + "---|" * 13, *rows]) + "\n"
