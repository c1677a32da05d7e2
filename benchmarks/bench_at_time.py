"""Why `at_time` stays near chance: a trained demo model on VALIDATION videos, never the held-out ones.

    python benchmarks/bench_at_time.py [CHECKPOINT ...] [--n 400] [--seed 5000]

For each checkpoint (default runs/demo/model):
  sweep    video QA on `--n` validation videos (all four tasks) at one package per second, 1 and 4 frames per
           package, per task (reports/video.md section 2 compares full demos on these videos);
  at_time  at 4 frames per package on at_time videos only (the same number of them): accuracy by the asked second
           k and by the video's length n, and the share of wrong answers that name a colour the video does show
           (high: the model sees the colours but cannot tell which package is second k);
  per task `--per-task` videos of each task alone at 4 frames per package, with 95% Wilson intervals (the size the
           demo's held-out set has per task: what the weak tasks score when ~100 questions cannot show it).
Validation seed 5000 is the one the design experiments used (recipes/demo.py keeps seed + 7000 for the report).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.demo import VIDEO_FPS, Cached  # noqa: E402
from vlmcook.checkpoint import load_model  # noqa: E402
from vlmcook.data.docs.grid import VIEW_SIZE  # noqa: E402
from vlmcook.data.synth_video import TASKS, SynthVideoQA  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402
from vlmcook.eval.metrics import normalize_answer  # noqa: E402
from vlmcook.eval.tasks.common import group_means  # noqa: E402
from vlmcook.eval.video_qa import eval_video_qa, packing_sweep, video_items  # noqa: E402


def rates(groups: dict) -> str:
    return ", ".join(f"{k}: {g['score']:.2f} ({g['n']})" for k, g in groups.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", default=["runs/demo/model"])
    ap.add_argument("--n", type=int, default=400, help="validation videos per part (default 400)")
    ap.add_argument("--seed", type=int, default=5000, help="validation video seed (default 5000)")
    ap.add_argument("--per-task", type=int, default=400, help="videos of each task alone (default 400; 0: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mixed = Cached(SynthVideoQA(seed=args.seed, n=args.n, size=VIEW_SIZE, fps=VIDEO_FPS))
    at_time = Cached(SynthVideoQA(seed=args.seed, n=args.n, size=VIEW_SIZE, fps=VIDEO_FPS, tasks=("at_time",)))
    for ckpt in map(Path, args.checkpoints):
        tok, model = Tokenizer.from_dir(ckpt), load_model(ckpt, dtype="float32")
        cfg = model.config
        print(f"== {ckpt}")
        for k, r in packing_sweep(model, tok, cfg, mixed, range(args.n), packings=(1, 4)).items():
            tasks = ", ".join(f"{t} {a:.3f}" for t, a in r["per_task"].items())
            print(f"sweep, {k} frame(s)/package: {r['accuracy']:.3f} ({tasks})")
        res = eval_video_qa(model, tok, video_items(at_time, range(args.n), tok, cfg, fps=4.0, packing=4))
        facts = [at_time.source.scene(i).facts for i in range(args.n)]
        by = group_means([{"score": hit, "second": f["second"], "length": len(f["colours"])}
                          for hit, f in zip(res["hits"], facts)], ("second", "length"), scale=1.0)["by"]
        named = [normalize_answer(out) in f["colours"] for hit, out, f in zip(res["hits"], res["outputs"], facts)
                 if not hit]
        print(f"at_time, 4 frames/package: {res['accuracy']:.3f} (n={args.n})")
        print(f"  by asked second k: {rates(by['second'])}")
        print(f"  by video length n: {rates(by['length'])}")
        print(f"  wrong answers naming a colour the video shows: {sum(named) / max(1, len(named)):.2f} "
              f"({len(named)} wrong)")
        for task in TASKS if args.per_task else ():
            if task == "at_time" and args.per_task == args.n:
                r = res  # the same videos as the at_time part above
            else:
                alone = Cached(SynthVideoQA(seed=args.seed, n=args.per_task, size=VIEW_SIZE, fps=VIDEO_FPS,
                                            tasks=(task,)))
                r = eval_video_qa(model, tok, video_items(alone, range(args.per_task), tok, cfg, fps=4.0, packing=4))
            print(f"per task, {task} alone, 4 frames/package: {r['accuracy']:.3f} "
                  f"(95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}, n={args.per_task})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
