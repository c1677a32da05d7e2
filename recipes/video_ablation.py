"""The paper's 3D-resampler ablation at toy scale: the 2D->3D upgrade vs staying 2D, equal compute, equal budget.

    python recipes/video_ablation.py --demo runs/demo [--seeds 0,1,2] [--out runs/video_ablation]

Starts from the demo's checkpoint after SFT (`<demo>/after_sft`, trained on one frame per package) and its data
folder. For each seed, two arms run the demo's last step (same steps, lr, schedule and tokens per step):
  3d: the 2D->3D step as the demo runs it (docs 0.2 + videos at a random package size 1-6, one package a second)
  2d: the same step with the videos at one frame per package (the model stays 2D)
Both arms are then scored on the demo's first `videos_sweep` held-out videos (its sweep's) at one package per
second (equal visual tokens): the 3d arm at 4 frames per package, the 2d arm at 1 (its training regime); the 3d
arm also at 1 (what the upgrade does to plain 2D input).

Pre-registered (fixed before the first full run): per question, the 3d-minus-2d hit difference averaged over the
seeds; the 95% interval of its mean over the questions (normal approximation, questions as the unit, so the shared
questions across seeds are not counted as independent). "3D better" iff the interval is above 0, "2D better" iff
below, else "no difference shown"; per task the same, reported but not claimed. Writes `<out>/video_ablation.json`
and prints the table (reports/video.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes import demo as D  # noqa: E402
from vlmcook.checkpoint import load_model  # noqa: E402
from vlmcook.data.docs.grid import VIEW_SIZE  # noqa: E402
from vlmcook.data.synth_video import SynthVideoQA  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402
from vlmcook.eval.video_qa import eval_video_qa, video_items  # noqa: E402
from vlmcook.train.data import JsonlRecords, RecordSource  # noqa: E402

ARMS = {"3d": D.Step("video3d", "cosine", {"docs": 0.2, "video3d": 0.8}),
        "2d": D.Step("video3d", "cosine", {"docs": 0.2, "video2d": 0.8})}
EVAL = (("3d", 4), ("2d", 1), ("3d", 1))  # (arm, frames per package)


def pools(data: Path, tok, cfg, seed: int) -> dict:
    """The demo's training pages and videos, from its data folder."""
    docs = JsonlRecords(data / "docs_train" / "samples.jsonl")
    videos = JsonlRecords(data / "videos_train" / "data.jsonl")
    kw = dict(root=videos.path.parent, max_length=cfg.llm.max_position_embeddings)
    return {"docs": D.pool(docs, tok, cfg, docs.path.parent, "docs"),
            "video2d": RecordSource(D.Edited(videos, D.per_second(packing=1)), tok, cfg, **kw),
            "video3d": RecordSource(D.Edited(videos, D.per_second(seed=seed)), tok, cfg, **kw)}


def mean_ci(d: list[float], z: float = 1.96) -> dict:
    n, m = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    return {"diff": m, "ci95": (m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n)), "n": n}


def verdict(ci: tuple[float, float]) -> str:
    return "3D better" if ci[0] > 0 else "2D better" if ci[1] < 0 else "no difference shown"


def plot(runs: dict, seeds: list[int], path: Path) -> None:
    """Per task: accuracy of 2d@1, 3d@1 and 3d@4 (bars: mean over seeds; dots: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [k for k in ("2d@1", "3d@1", "3d@4") if all(f"{k}:{s}" in runs for s in seeds)]
    tasks = sorted(runs[f"{arms[0]}:{seeds[0]}"]["per_task"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for j, arm in enumerate(arms):
        xs = [i + (j - 1) * 0.27 for i in range(len(tasks))]
        per_seed = [[runs[f"{arm}:{s}"]["per_task"][t] for s in seeds] for t in tasks]
        ax.bar(xs, [sum(v) / len(v) for v in per_seed], width=0.25, label=arm.replace("@", " at ") + " frame(s)/pkg")
        for x, v in zip(xs, per_seed):
            ax.scatter([x] * len(v), v, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy")
    ax.set_title(f"2D-only vs 2D->3D step, equal visual tokens ({len(seeds)} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo", help="a finished demo run (its after_sft/ and data/)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the last step (default 0,1,2)")
    ap.add_argument("--out", default="runs/video_ablation")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = json.loads((demo / "metrics.json").read_text())
    plan, seed0 = D.Plan(**{**r["plan"]}), r["seed"]
    tok = Tokenizer.from_dir(demo / "after_sft")
    trunk = load_model(demo / "after_sft", dtype="float32")
    cfg = trunk.config
    held = D.Cached(SynthVideoQA(seed=seed0 + D.HELD_OUT_VIDEOS, n=plan.sweep_videos, size=VIEW_SIZE,
                                 fps=D.VIDEO_FPS))  # the demo's sweep videos: its first held-out videos
    items = {k: video_items(held, range(len(held)), tok, cfg, fps=float(k), packing=k) for k in (1, 4)}
    t0, runs = time.perf_counter(), {}
    for seed in map(int, args.seeds.split(",")):
        done = out / f"seed-{seed}.json"  # a finished seed is kept: reruns resume, seeds can run in parallel
        if done.is_file():
            runs |= json.loads(done.read_text())
            continue
        data, mine = pools(demo / "data", tok, cfg, seed), {}
        for arm, step in ARMS.items():
            model = load_model(demo / "after_sft", dtype="float32")
            logs = D.train_recipe(model, data, plan, seed, tok, steps=("video3d",),
                                  recipe={**D.RECIPE, "video3d": step})["video3d"]
            for a, k in EVAL:
                if a == arm:
                    res = eval_video_qa(model, tok, items[k])
                    mine[f"{arm}@{k}:{seed}"] = {"accuracy": res["accuracy"], "ci95": res["ci95"],
                                                 "per_task": res["per_task"], "hits": res["hits"],
                                                 "tasks": res["tasks"], "last_loss": logs[-1]["loss"]}
                    print(f"[ablation] seed {seed} {arm} at {k} frame(s)/package: accuracy {res['accuracy']:.3f} "
                          f"{ {t: round(x, 3) for t, x in res['per_task'].items()} }", flush=True)
        done.write_text(json.dumps(mine))
        runs |= mine
    seeds = sorted({int(k.split(":")[1]) for k in runs})
    tasks = runs[f"3d@4:{seeds[0]}"]["tasks"]

    def diffs(a: str, b: str, task: str | None = None) -> list[float]:
        return [sum(runs[f"{a}:{s}"]["hits"][i] - runs[f"{b}:{s}"]["hits"][i] for s in seeds) / len(seeds)
                for i, t in enumerate(tasks) if task in (None, t)]

    primary = mean_ci(diffs("3d@4", "2d@1"))
    result = {"seeds": seeds, "steps": plan.steps["video3d"], "n_questions": len(tasks),
              "accuracy": {k.split(":")[0]: sum(runs[f"{k.split(':')[0]}:{s}"]["accuracy"] for s in seeds) / len(seeds)
                           for k in runs},
              "per_seed": {k: {"accuracy": v["accuracy"], "per_task": v["per_task"]} for k, v in runs.items()},
              "3d@4_minus_2d@1": {**primary, "verdict": verdict(primary["ci95"]),
                                  "per_task": {t: mean_ci(diffs("3d@4", "2d@1", t)) for t in sorted(set(tasks))}},
              "3d@1_minus_2d@1": mean_ci(diffs("3d@1", "2d@1")), "seconds": time.perf_counter() - t0}
    (out / "video_ablation.json").write_text(json.dumps(result, indent=2))
    plot(runs, seeds, out / "video_ablation.png")
    p = result["3d@4_minus_2d@1"]
    print(f"\n3D (2D->3D step, 4 frames/package) minus 2D (1 frame/package), equal budget, {len(seeds)} seeds, "
          f"{len(tasks)} questions: {p['diff']:+.3f} (95% CI {p['ci95'][0]:+.3f} to {p['ci95'][1]:+.3f}) -> "
          f"{p['verdict']}")
    for t, x in p["per_task"].items():
        print(f"  {t}: {x['diff']:+.3f} ({x['ci95'][0]:+.3f} to {x['ci95'][1]:+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
