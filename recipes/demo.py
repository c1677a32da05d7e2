"""The main job: the MiniCPM-V 4.5 recipe at toy scale on a CPU, then evaluation and a report.

    vlmcook demo [--quick] [--out runs/demo] [--seed 0]          (the same as: python recipes/demo.py ...)

1. Data (vlmcook/data, held-out sets from other seeds): tape pages corrupted at three levels (data/docs/grid.py),
   synthetic image QA, text QA, repeat-the-text records and synthetic video QA; every view 196 x 98 px.
2. One model (the `demo` preset: text before media in every user turn, `config.text_first`, because a page is
   read by copying the visual tokens right before the answer: held-out CER 0.379 with the question first vs 0.869
   page first, benchmarks/bench_reading_recipe.py; one token per character) through every step of RECIPE
   with train/loop.py: first the parts the release starts pre-trained (`lm`: the LLM on repeat-the-text, for
   Qwen3; `vision`: tower + resampler emit the LLM's character embeddings, for SigLIP, a loss hook of the same
   loop), then the report's stages pt1 -> pt2 -> pt3 (WSD), SFT (cosine, videos one frame per package) and the
   2D->3D stage (random package size and frame rate per video).
3. Evaluation (vlmcook/eval): OCR CER per corruption level, video QA accuracy, 3D vs 2D at an equal visual-token
   budget, each against untrained seeds, chance and the majority answer; verdict margins fixed in `verdicts`.
4. `<out>/model` (what `vlmcook chat` loads), `<out>/metrics.json`, `<out>/<name>.md` + plots (demo_report.py).
Learning rates are from-scratch ones (1e-3), not the report's fine-tuning ones. Measured: reports/demo.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmcook.config import PRESETS  # noqa: E402
from vlmcook.data.docs.grid import VIEW_SIZE, CopyText, glyph_labels, grid_cells, grid_page, random_titles, \
    write_grid_docs  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402
from vlmcook.model.minicpmv import MiniCPMV  # noqa: E402
from vlmcook.train.loop import TrainConfig, train  # noqa: E402
from vlmcook.train.scratch import init_for_scratch  # noqa: E402

VIDEO_FPS = 6.0  # rendered rate of the synthetic videos: every sampling rate used (k frames a second, k <= 6)
# Video protocol: one package per second of video, k frames in it (fps = packing = k). A temporal id changes a
# package's tokens only through how its queries weigh its frames (ids are added to the keys, docs/reference.md 5.3:
# a static package reads the same at any time, benchmarks/bench_video_probe.py), so the LLM learns time from the
# place of a package in the sequence, which must then mean the same time in training and evaluation. It also makes
# every packing an equal visual-token budget: packages = seconds.
PACKINGS = (1, 2, 3, 4, 6)  # the equal-budget sweep; 1 is 2D (one frame per package)
EVAL_PACKING = 4  # the headline video QA setting (4 frames per package)
# The held-out videos' seed offset. Design experiments for the video protocol validated on seed 5000 (and, before
# this was fixed, on seed 2000); the reported numbers come from videos of this seed, used for nothing else.
HELD_OUT_VIDEOS = 7000


@dataclass(frozen=True)
class Step:
    stage: str  # which parameters train: a stage of vlmcook.train.common.STAGES
    schedule: str
    mixture: dict  # pool -> weight (the vision step draws its own batches)


# The recipe, in order. Pools: copy (repeat a text), text (text QA), docs (OCR), images (image QA), video2d (one frame
# per package), video3d (random package size and frame rate), glyphs (clean pages for the vision step).
RECIPE = {
    "lm": Step("lm", "wsd", {"copy": 1.0}),
    "vision": Step("pt2", "constant", {"glyphs": 1.0}),
    "pt1": Step("pt1", "wsd", {"docs": 0.6, "images": 0.4}),
    "pt2": Step("pt2", "wsd", {"docs": 0.6, "images": 0.4}),
    "pt3": Step("pt3", "wsd", {"docs": 0.6, "images": 0.3, "text": 0.1}),
    "sft": Step("sft", "cosine", {"docs": 0.35, "images": 0.1, "text": 0.05, "video2d": 0.5}),
    "video3d": Step("video3d", "cosine", {"docs": 0.2, "video3d": 0.8}),
}


@dataclass(frozen=True)
class Plan:
    name: str
    steps: dict  # recipe step -> optimizer steps
    docs_train: int
    docs_eval: int
    images: int
    texts: int
    videos_train: int  # training videos (the 2D and the 3D pool are the same videos, sampled differently)
    videos_eval: int  # held-out videos of the headline video QA (about a quarter per task)
    copies: int = 4000  # lm step: repeat-the-text records
    glyph_pages: int = 1000  # vision step: clean pages
    batch_tokens: int = 1024  # tokens per optimizer step (one micro-batch, packed)
    row_tokens: int = 512
    # pt1 / pt2 (resampler, + tower, against the frozen LLM) at a tenth of pt3's lr: at 1e-3 they can undo the
    # vision step's alignment (glyph accuracy of the visual tokens 0.997 -> 0.044 -> 0.002 at seed 0, which then never
    # reads: CER 0.84), at 1e-4 they keep it (0.99 / 0.95) and seed 0 reads (CER 0.35, legible 0.03); reports/video.md
    lr: dict = field(default_factory=lambda: {"lm": 3e-3, "vision": 1e-3, "pt1": 1e-4, "pt2": 1e-4, "pt3": 1e-3,
                                              "sft": 5e-4, "video3d": 5e-4})
    untrained_seeds: int = 3
    # The first `videos_sweep` held-out videos are also scored at every packing (the equal-budget sweep), by the
    # untrained seeds and by recipes/video_ablation.py. Why the headline set is larger (1600 = 400 a task): a task
    # learned weakly must still be shown above its bar. On validation videos the demo model answers at_time 0.253
    # (400 questions, benchmarks/bench_at_time.py) against a bar of 0.167-0.19; for its 95% interval's lower end to
    # clear 0.19 four times in five, n = (1.96 + 0.84)^2 p (1 - p) / (p - 0.19)^2 = 408 questions (~100 gave
    # +-0.09: reports/video.md section 4).
    videos_sweep: int = 400

    @property
    def sweep_videos(self) -> int:
        """How many held-out videos the sweep, the untrained seeds and the ablation score (the first ones)."""
        return min(self.videos_sweep, self.videos_eval)


PLANS = {
    "quick": Plan("demo_quick", {"lm": 600, "vision": 200, "pt1": 10, "pt2": 10, "pt3": 350, "sft": 100,
                                 "video3d": 100}, docs_train=1500, docs_eval=40, images=100, texts=60,
                  videos_train=300, videos_eval=100, videos_sweep=100),
    "full": Plan("demo", {"lm": 800, "vision": 300, "pt1": 100, "pt2": 100, "pt3": 900, "sft": 700, "video3d": 1800},
                 docs_train=4000, docs_eval=100, images=300, texts=150, videos_train=1500, videos_eval=1600),
}


def smoke_plan(steps: int = 2) -> Plan:
    """A seconds-long plan for tests: every step and every evaluation runs, on a handful of samples."""
    return Plan("demo_smoke", {s: steps for s in RECIPE}, docs_train=6, docs_eval=4, images=4, texts=4,
                videos_train=4, videos_eval=4, copies=4, glyph_pages=4, batch_tokens=400, row_tokens=400,
                untrained_seeds=2, videos_sweep=2)


def smoke_config():
    """A still smaller model for smoke tests (the `tiny` widths, the demo's view size)."""
    return replace(PRESETS["tiny"], scale_resolution=140, max_slice_nums=1, text_first=True)


# ---- data ------------------------------------------------------------------------------------------------------
class Cached:
    """A seeded source's `record(i)`, computed once (a video is rendered and encoded once)."""

    def __init__(self, source):
        self.source, self.cache = source, {}

    def __len__(self) -> int:
        return len(self.source)

    def record(self, i: int) -> dict:
        if i not in self.cache:
            self.cache[i] = self.source.record(i)
        return self.cache[i]


class Seeded(Cached):
    """train.data records `(record, where)` over a seeded source, with `edit(i, record)` applied (e.g. the video
    knobs of the 2D->3D step)."""

    def __init__(self, source, name: str, edit=None):
        super().__init__(source)
        self.name, self.edit = name, edit

    def record(self, i: int):
        rec = super().record(i)
        return (rec if self.edit is None else self.edit(i, dict(rec))), f"{self.name}[{i}]"


def per_second(packing: int | None = None, seed: int | None = None):
    """-> edit(i, record): one package per second of video, `packing` frames in each (fps = packing); with `seed`,
    the 2D->3D step's packing, drawn in 1..6 per video as a pure function of (seed, i)."""
    def edit(i: int, rec: dict) -> dict:
        k = packing if seed is None else random.Random(f"demo-video3d:{seed}:{i}").randint(1, 6)
        return {**rec, "videos": [{**rec["videos"][0], "packing": k, "fps": float(k)}]}
    return edit


class FileRecords:
    """The first `n` records of a written SynthVideoQA folder (`data.jsonl` + mp4 files), with absolute video paths
    (what video_items / packing_sweep read); the file is read at the first `record`."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n, self.records = Path(folder), n, None

    def __len__(self) -> int:
        return self.n

    def record(self, i: int) -> dict:
        if self.records is None:
            self.records = [json.loads(line) for line in (self.folder / "data.jsonl").read_text().splitlines()]
        rec = self.records[i]
        return {**rec, "videos": [{**v, "path": str(self.folder / v["path"])} for v in rec["videos"]]}


class Edited:
    """train.data records `(record, where)` of `records` with `edit(i, record)` applied."""

    def __init__(self, records, edit):
        self.records, self.edit = records, edit

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int):
        rec, where = self.records.record(i)
        return self.edit(i, dict(rec)), where


def pool(records, tok, cfg, root=None, desc: str = "") -> list[dict]:
    """Process every record once (train.data.RecordSource; skipped records are counted and reported)."""
    from tqdm import tqdm

    from vlmcook.train.data import RecordSource

    src = RecordSource(records, tok, cfg, root=root, max_length=cfg.llm.max_position_embeddings)
    out = [s for s in tqdm((src[i] for i in range(len(src))), total=len(src), desc=desc, unit="sample")
           if s is not None]
    if src.skips.total:
        print(f"[demo] {desc}: {src.skips.summary()}")
    return out


def glyph_pool(n: int, seed: int, cfg, tok) -> list[dict]:
    """The vision step's data: n clean tape pages (another seed's titles) as one view each, with the class of the
    character under each resampler query (`glyph_labels`)."""
    from vlmcook.data.docs.synthetic import find_fonts
    from vlmcook.data.processor import Processor

    proc, fonts, titles = Processor(tok, cfg), find_fonts(), random_titles(seed)
    out = []
    for i in range(n):
        page = grid_page(i, seed, titles, fonts)
        view = proc([{"role": "user", "content": [page.image, "."]}])["pixel_values"][0][0]
        out.append({"view": view, "labels": glyph_labels(page, cfg.resampler.num_queries)})
    return out


def make_pools(data: Path, plan: Plan, seed: int, tok, cfg) -> tuple[dict, dict]:
    """Training pools + held-out sources. Held-out seeds: docs seed+1000, videos seed+HELD_OUT_VIDEOS."""
    from vlmcook.data.synth_images import SynthImageQA, SynthText
    from vlmcook.data.synth_video import SynthVideoQA
    from vlmcook.train.data import JsonlRecords, RecordSource

    docs, skip_train = write_grid_docs(data / "docs_train", plan.docs_train, seed)
    docs_eval, skip_eval = write_grid_docs(data / "docs_eval", plan.docs_eval, seed + 1000)
    videos = SynthVideoQA(seed=seed, n=plan.videos_train, size=VIEW_SIZE, fps=VIDEO_FPS)
    video_records = JsonlRecords(videos.write(data / "videos_train"))  # real mp4 files, processed when drawn
    records = JsonlRecords(docs)
    pools = {"docs": pool(records, tok, cfg, records.path.parent, "docs"),
             "images": pool(Seeded(SynthImageQA(seed=seed, n=plan.images, size=VIEW_SIZE,
                                                 tasks=("caption", "word", "colour")), "images"),
                            tok, cfg, desc="image QA"),
             "text": pool(Seeded(SynthText(seed=seed, n=plan.texts), "text"), tok, cfg, desc="text QA"),
             "copy": pool(Seeded(CopyText(seed + 3000, plan.copies), "copy"), tok, cfg, desc="repeat-the-text"),
             "glyphs": glyph_pool(plan.glyph_pages, seed + 4000, cfg, tok),
             # processed when a batch draws them (train.data.in_background): tens of MB of mp4 instead of GBs of
             # pixels in memory
             "video2d": RecordSource(Edited(video_records, per_second(packing=1)), tok, cfg,
                                     root=video_records.path.parent, max_length=cfg.llm.max_position_embeddings),
             "video3d": RecordSource(Edited(video_records, per_second(seed=seed)), tok, cfg,
                                     root=video_records.path.parent, max_length=cfg.llm.max_position_embeddings)}
    held_out = {"docs": docs_eval, "videos": FileRecords(data / "videos_eval", plan.videos_eval),  # see held_out_job
                "video_source": SynthVideoQA(seed=seed + HELD_OUT_VIDEOS, n=plan.videos_eval, size=VIEW_SIZE,
                                             fps=VIDEO_FPS),
                "video_meta": [{"task": s.task, "answer": s.answer} for s in map(videos.scene, range(len(videos)))],
                "skipped_pages": len(skip_train) + len(skip_eval),
                "train_texts": {s["messages"][-1]["content"] for s in map(json.loads, docs.read_text().splitlines())}}
    return pools, held_out


# ---- training --------------------------------------------------------------------------------------------------
def glyph_loss(model, tok):
    """The vision step's objective (standing in for SigLIP + the alignment pt1 gets from captions at scale): each
    query's output should be nearest to the frozen LLM input embedding of the character in its cell, i.e.
    cross-entropy over the 95 printable characters of logits = visual token . embedding [B*Q, 95]."""
    chars = torch.tensor([tok.encode(chr(32 + c))[0] for c in range(95)])
    emb = model.llm.model.embed_tokens.weight.detach()[chars]  # [95, D]

    def loss_fn(net, batch: dict) -> torch.Tensor:
        tokens = net.encode_views(batch["views"], [[-1]] * len(batch["views"]))  # [B, Q, D]
        return torch.nn.functional.cross_entropy((tokens @ emb.T).flatten(0, 1), batch["labels"].flatten())
    return loss_fn


def glyph_batches(glyphs: list[dict], seed: int, batch: int = 16):
    def source(position: int):
        for step in range(position, 1 << 62):
            picked = random.Random(f"demo-vision:{seed}:{step}").sample(glyphs, min(batch, len(glyphs)))
            labels = torch.stack([g["labels"] for g in picked])  # [B, Q]
            yield {"views": [g["view"] for g in picked], "labels": labels, "num_targets": labels.numel()}
    return source


def train_recipe(model, pools: dict, plan: Plan, seed: int, tok, steps=tuple(RECIPE), recipe=RECIPE) -> dict:
    """`steps` of `recipe` in order on one model (train/loop.py); -> {step: [{"loss", "lr", ...} per step]}."""
    from vlmcook.train.data import Mixture, in_background, token_batches

    history = {}
    for name in steps:
        step, lr = recipe[name], plan.lr[name]
        cfg = TrainConfig(stage=step.stage, steps=plan.steps[name], lr=lr, min_lr=lr / 10, schedule=step.schedule,
                          warmup_frac=0.05, decay_frac=0.2, seed=seed, log_every=0, weight_decay=0.01)
        if name == "vision":
            batches, loss_fn = glyph_batches(pools["glyphs"], seed), glyph_loss(model, tok)
        else:
            sources = [(pools[k], w) for k, w in step.mixture.items() if pools.get(k)]
            mixture = Mixture(sources, seed=f"{seed}:{name}")  # each step its own draws
            batches = in_background(token_batches(mixture, plan.batch_tokens, plan.row_tokens, tok.pad_id))
            loss_fn = None
        print(f"[demo] {name}: {plan.steps[name]} steps, trains {step.stage!r}, {step.schedule}, lr {lr:g}")
        logs = history[name] = []
        train(cfg, model, batches, tokenizer=tok, on_step=lambda i, m: logs.append(dict(m)), loss_fn=loss_fn)
    return history


# ---- evaluation ------------------------------------------------------------------------------------------------
def untrained(cfg, seed: int) -> MiniCPMV:
    torch.manual_seed(seed)
    model = MiniCPMV(cfg)
    init_for_scratch(model, grid_cells(cfg.resampler.num_queries))
    return model


def evaluate(model, tok, cfg, held: dict, plan: Plan, items: dict | None = None) -> tuple[dict, dict]:
    """OCR + video QA of one model; `items` (prompts) are built once and reused for every model."""
    from vlmcook.eval.ocr import eval_ocr, ocr_items
    from vlmcook.eval.video_qa import eval_video_qa, video_items

    if items is None:
        items = {"ocr": ocr_items(held["docs"], tok, cfg),
                 "video": video_items(held["videos"], range(len(held["videos"])), tok, cfg,
                                      fps=float(EVAL_PACKING), packing=EVAL_PACKING)}
    max_ocr = max(len(tok.encode(it.reference)) for it in items["ocr"]) + 8
    return {"ocr": eval_ocr(model, tok, items["ocr"], max_ocr), "video": eval_video_qa(model, tok, items["video"])}, items


def held_out_job(held: dict, plan: Plan, seed: int, tok, cfg) -> list[dict]:
    """What evaluation needs and training does not, run by a background process during training on the core it
    leaves idle: write the held-out videos as real mp4 files (`held["videos"]` reads them), then score the untrained
    seeds on the held-out pages and the first `videos_sweep` videos. -> one `evaluate` result per untrained seed."""
    torch.set_num_threads(1)
    held["video_source"].write(held["videos"].folder)
    first = {**held, "videos": FileRecords(held["videos"].folder, plan.sweep_videos)}
    items, base = None, []
    for s in range(seed, seed + plan.untrained_seeds):
        res, items = evaluate(untrained(cfg, s), tok, cfg, first, plan, items)
        base.append(res)
    return base


def in_process(fn, *args):
    """Start fn(*args) in a fresh (spawned: no thread state copied) process; -> a Future of its result."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    job = workers.submit(fn, *args)
    workers.shutdown(wait=False)  # the process ends when the job does
    return job


VIDEO_TASKS = ("order", "count", "at_time", "motion")  # every task needs more than one frame (tests/test_synth.py)


def verdicts(trained: dict, base: list[dict], video_base: dict, sweep: dict) -> dict:
    """The rules behind the report's verdicts, fixed in code before the runs they judge (the report explains them).

    OCR learned: trained CER (clipped at 1) below the best untrained seed's by more than max(0.10, 3 x the seeds'
    sd). Reads: CER on legible pages against their own page's text below the same outputs against another page's
    by more than 0.10. Video learned: the lower end of the trained accuracy's 95% Wilson interval above every
    untrained seed. Above baselines: that lower end above max(chance, majority answer), overall and for each task
    (its own interval, chance and majority). 3D vs 2D (same model, one package per second = equal visual tokens):
    packing EVAL_PACKING minus packing 1 on the same questions; "3D better" if the paired 95% interval is above 0,
    "2D better" if below, else "no difference shown"."""
    from vlmcook.eval.video_qa import paired_difference

    cers = [min(1.0, b["ocr"]["cer"]) for b in base]
    sd = statistics.pstdev(cers) if len(cers) > 1 else 0.0
    ocr_margin = max(0.10, 3 * sd)
    v = trained["video"]
    base_best = max(b["video"]["accuracy"] for b in base)
    bar = max(video_base["chance"], video_base["majority"])
    tasks = {}
    for t in VIDEO_TASKS:
        if t in v["per_task"]:
            tb = video_base["per_task"][t]
            tbar = max(tb["chance"], tb["majority"])
            tasks[t] = {"accuracy": v["per_task"][t], "ci95": v["per_task_ci95"][t], "bar": tbar,
                        "above_baselines": v["per_task_ci95"][t][0] > tbar}
    low = trained["ocr"]["per_level"].get("low", float("nan"))
    low_other = trained["ocr"]["per_level_other_page"].get("low", float("nan"))
    d = paired_difference(sweep[EVAL_PACKING]["hits"], sweep[1]["hits"])
    d["per_task"] = {t: paired_difference(*[[h for h, tt in zip(sweep[k]["hits"], sweep[k]["tasks"]) if tt == t]
                                            for k in (EVAL_PACKING, 1)]) for t in tasks if t in sweep[1]["tasks"]}
    d["verdict"] = "3D better" if d["ci95"][0] > 0 else "2D better" if d["ci95"][1] < 0 else "no difference shown"
    return {"ocr": {"learned": min(1.0, trained["ocr"]["cer"]) < min(cers) - ocr_margin, "margin": ocr_margin,
                    "untrained_best": min(cers), "untrained_sd": sd, "reads": low < low_other - 0.10, "low": low,
                    "low_other_page": low_other},
            "video": {"learned": v["ci95"][0] > base_best, "untrained_best": base_best,
                      "above_baselines": v["ci95"][0] > bar, "bar": bar, "majority": video_base["majority"],
                      "tasks": tasks, "every_task_above_baselines": all(x["above_baselines"] for x in tasks.values())},
            "3d_vs_2d": d}


# ---- the run ---------------------------------------------------------------------------------------------------
def run(out: str = "runs/demo", seed: int = 0, quick: bool = False, plan: Plan | None = None,
        steps: int | None = None, config=None, threads: int = 1) -> dict:
    """The whole job; `plan` overrides the quick/full choice, `steps` sets every step count, `config` the model
    (default: the `demo` preset). One intra-op thread: at these widths a matmul is too small to split (measured on
    2 cores: two threads cost 2-5x the CPU time of one for the same forward + backward)."""
    from vlmcook.checkpoint import save_model
    from vlmcook.eval.video_qa import baselines, packing_sweep, paired_difference

    from recipes.demo_report import summary, write_report

    plan = plan or PLANS["quick" if quick else "full"]
    if steps is not None:
        plan = replace(plan, steps={s: steps for s in RECIPE})
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), _cpu()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg, tok = config or PRESETS["demo"], Tokenizer.tiny(chars=True)
    timings = {}
    print(f"[demo] {plan.name}: data (seed {seed})")
    pools, held = make_pools(out_dir / "data", plan, seed, tok, cfg)
    timings["data"] = time.perf_counter() - t0
    baseline_job = in_process(held_out_job, held, plan, seed, tok, cfg)

    model = untrained(cfg, seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] model: {n_params:,} parameters; steps " + ", ".join(f"{s} {plan.steps[s]}" for s in RECIPE))
    t = time.perf_counter()
    history = train_recipe(model, pools, plan, seed, tok, steps=tuple(RECIPE)[:-1])
    save_model(model, out_dir / "after_sft", tokenizer=tok)  # where recipes/video_ablation.py branches off
    history |= train_recipe(model, pools, plan, seed, tok, steps=("video3d",))
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    save_model(model, out_dir / "model", tokenizer=tok)
    print(f"[demo] untrained seeds {seed}-{seed + plan.untrained_seeds - 1}: scored in the background")
    base = baseline_job.result()  # raises what the background job raised
    print("[demo] evaluating the trained model")
    trained, items = evaluate(model, tok, cfg, held, plan)
    print(f"[demo] equal-budget sweep: packings {PACKINGS} at one package per second, first {plan.sweep_videos} "
          "videos")
    sweep = packing_sweep(model, tok, cfg, held["videos"], range(plan.sweep_videos), PACKINGS)
    video_base = baselines(held["video_meta"], items["video"])
    verdict = verdicts(trained, base, video_base, sweep)
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    timings["cpu"] = _cpu() - c0
    seen = sum(it.reference in held["train_texts"] for it in items["ocr"]) / len(items["ocr"])
    results = {"plan": asdict(plan), "recipe": {k: asdict(v) for k, v in RECIPE.items()}, "seed": seed,
               "params": n_params, "config": cfg.to_dict(), "history": history, "trained": _strip(trained),
               "untrained": [_strip(b) for b in base], "verdict": verdict, "timings": timings,
               "video_qa": {"accuracy": trained["video"]["accuracy"], "ci95": trained["video"]["ci95"],
                            "majority": video_base["majority"], "chance": video_base["chance"],
                            "per_task": verdict["video"]["tasks"], "packing": EVAL_PACKING, "n": trained["video"]["n"]},
               "compare_3d_2d": {"budget": "one package per second of video (packages x query_num visual tokens)",
                                 "packings": {str(k): _strip(r) for k, r in sweep.items()},
                                 "minus_2d": {str(k): paired_difference(r["hits"], sweep[1]["hits"])
                                              for k, r in sweep.items() if k != 1},
                                 "paired": verdict["3d_vs_2d"]},
               "ocr_refs_seen_in_training": seen,
               "skipped_pages": held["skipped_pages"], "pool_sizes": {k: len(v) for k, v in pools.items()},
               "threads": torch.get_num_threads()}
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
    report = write_report(results, out_dir, plan.name)
    print(summary(results, out_dir, report))
    return results


def _cpu() -> float:
    """CPU seconds of this process and of finished child processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _strip(d):
    """Drop per-sample lists (metrics.json stays short)."""
    return {k: _strip(v) for k, v in d.items() if k not in ("outputs", "hits", "tasks")} if isinstance(d, dict) else d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlmcook demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short plan (a few minutes): format and vocabulary only")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; its model/ is what "
                                                      "`vlmcook chat` loads by default)")
    p.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    p.add_argument("--steps", type=int, help="set every recipe step's optimizer steps (for smoke runs)")
    args = p.parse_args(argv)
    run(out=args.out, seed=args.seed, quick=args.quick, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
