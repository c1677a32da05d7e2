"""The demo's report: markdown + PNG plots (loss curves of every step; OCR CER per level and video QA accuracy,
trained vs untrained; 3D vs 2D at an equal visual-token budget), and the console summary. Input: the demo's
results dict (metrics.json).

matplotlib runs headless (Agg backend); the markdown links the PNGs by file name, so the report and its plots can
be moved together.
"""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(history: dict, path: Path) -> Path:
    """Training loss of every step, stages side by side on one x axis (step counted across stages)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    x0 = 0
    for stage, logs in history.items():
        ys = [m["loss"] for m in logs]
        ax.plot(range(x0, x0 + len(ys)), ys, label=stage, linewidth=1)
        x0 += len(ys)
        ax.axvline(x0, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("training loss (mean CE per label token)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Loss per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(r: dict, path: Path) -> Path:
    """Three panels: CER per level, video QA accuracy per task, accuracy vs packing at an equal budget."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    tr, base = r["trained"], r["untrained"]
    levels = list(tr["ocr"]["per_level"])
    w = 0.8 / (1 + len(base))
    for k, (name, res) in enumerate([("trained", tr)] + [(f"untrained seed {r['seed'] + j}", b)
                                                         for j, b in enumerate(base)]):
        axes[0].bar([i + k * w for i in range(len(levels))], [res["ocr"]["per_level"].get(lv, 0) for lv in levels],
                    w, label=name)
    axes[0].set_xticks([i + w * len(base) / 2 for i in range(len(levels))], levels)
    axes[0].set_ylabel("character error rate (lower is better)")
    axes[0].set_title("OCR CER per corruption level")
    axes[0].legend(fontsize=7)

    tasks = list(tr["video"]["per_task"])
    for k, (name, res) in enumerate([("trained", tr)] + [(f"untrained {j}", b) for j, b in enumerate(base)]):
        axes[1].bar([i + k * w for i in range(len(tasks))], [res["video"]["per_task"].get(t, 0) for t in tasks], w,
                    label=name)
    axes[1].axhline(tr["video"]["chance"], color="black", linestyle="--", linewidth=1, label="chance (mean)")
    axes[1].set_xticks([i + w * len(base) / 2 for i in range(len(tasks))], tasks)
    axes[1].set_ylabel("accuracy")
    axes[1].set_title("Video QA accuracy per task")
    axes[1].legend(fontsize=7)

    c = r["compare_3d_2d"]["packings"]
    ks = sorted(c, key=int)
    accs = [c[k]["accuracy"] for k in ks]
    errs = [[a - c[k]["ci95"][0] for a, k in zip(accs, ks)], [c[k]["ci95"][1] - a for a, k in zip(accs, ks)]]
    axes[2].errorbar([int(k) for k in ks], accs, yerr=errs, marker="o", capsize=4)
    axes[2].axhline(r["video_qa"]["majority"], color="grey", linestyle=":", linewidth=1, label="majority answer")
    axes[2].set_xticks([int(k) for k in ks])
    axes[2].set_xlabel("frames per package (one package per second: equal visual tokens)")
    axes[2].set_ylabel("video QA accuracy (95% CI)")
    axes[2].set_title("Equal budget: accuracy vs packing")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_range(xs: list[float]) -> str:
    return " / ".join(f"{x:.3f}" for x in xs)


def markdown(r: dict, loss_png: str, metrics_png: str) -> str:
    tr, base, v = r["trained"], r["untrained"], r["verdict"]
    t, plan = r["timings"], r["plan"]
    seeds = [r["seed"] + j for j in range(len(base))]
    lv = list(tr["ocr"]["per_level"])
    low, low_other, reads = v["ocr"]["low"], v["ocr"]["low_other_page"], v["ocr"]["reads"]
    rows = [
        f"# vlmcook demo report: `{plan['name']}`",
        "",
        f"Whole recipe at toy scale on the CPU: {r['params']:,}-parameter model (the `demo` preset), seed {r['seed']}, "
        f"{r['threads']} torch thread(s). Wall time {t['total']:.0f} s (data {t['data']:.0f} s, training "
        f"{t['train']:.0f} s, checkpoint + evaluation {t['eval']:.0f} s); CPU time {t['cpu']:.0f} s.",
        "",
        "## Verdicts (margins fixed in code before this run; the OCR clipping was added after earlier runs)",
        "",
        f"- **OCR**: {'LEARNED' if v['ocr']['learned'] else 'NOT learned'}: trained CER {tr['ocr']['cer']:.3f} vs "
        f"best untrained {v['ocr']['untrained_best']:.3f} (margin required {v['ocr']['margin']:.3f} = max(0.10, "
        f"3 x untrained sd {v['ocr']['untrained_sd']:.3f})).",
        f"- **Video QA**: {'LEARNED' if v['video']['learned'] else 'NOT learned'}: trained accuracy "
        f"{tr['video']['accuracy']:.3f} (95% CI {tr['video']['ci95'][0]:.3f}-{tr['video']['ci95'][1]:.3f}, "
        f"n={tr['video']['n']}) vs the best untrained seed {v['video']['untrained_best']:.3f}; the CI's lower end "
        "must clear it.",
        f"- **Video QA above baselines**: {'YES' if v['video']['above_baselines'] else 'NO'}: the CI's lower end vs "
        f"max(chance {tr['video']['chance']:.3f}, majority-answer baseline {v['video']['majority']:.3f}) = "
        f"{v['video']['bar']:.3f}; per task (each needs more than one frame): " + ", ".join(
            f"{t} {x['accuracy']:.3f} (CI {x['ci95'][0]:.3f}-{x['ci95'][1]:.3f} vs {x['bar']:.3f}: "
            f"{'above' if x['above_baselines'] else 'NOT above'})" for t, x in v["video"]["tasks"].items()) + ".",
        f"- **3D vs 2D at an equal budget** (same model, one package per second; {v['3d_vs_2d']['n']} paired "
        f"questions): {v['3d_vs_2d']['verdict'].upper()}: packing {r['video_qa']['packing']} minus packing 1 = "
        f"{v['3d_vs_2d']['diff']:+.3f} (95% CI {v['3d_vs_2d']['ci95'][0]:+.3f} to {v['3d_vs_2d']['ci95'][1]:+.3f}).",
        f"- **Reads the pages**: {'YES' if reads else 'NO'}: CER on legible (low) pages {low:.3f} vs "
        f"{low_other:.3f} for the same outputs scored against another page's text; reading needs a gap > 0.10.",
        "",
        "Why these margins: an untrained model's CER varies with its init seed, so a gain must exceed that spread "
        "(3 sd; floored at 0.10 because a few seeds estimate the sd poorly), with CERs clipped at 1 for this "
        "verdict (an earlier version did not clip: the untrained seeds' run-on outputs, CER 1.8-3.3, made the "
        "3-sd bar negative, i.e. impossible). That gain can come from the language "
        "prior alone (right length, plausible words), so reading is judged separately: the model's outputs on "
        "legible pages are scored against their own page's text and against another page's; an output that "
        "ignores its page scores the same on both, so reading needs the first below the second by more than 0.10 "
        "(an earlier rule compared low with high-corruption pages; a model that writes differently for masked "
        "pages passed it without reading). An untrained model never emits a "
        "valid one-word answer, so beating it on video QA can be format learning alone; the stronger line therefore "
        "compares with chance and with the majority answer per task (what the question text alone allows). Both "
        "video lines use the 95% interval, so the sampling noise of n answers cannot pass.",
        "",
        "## Metrics",
        "",
        "| metric | trained | untrained (seeds " + ", ".join(map(str, seeds)) + ") |",
        "|---|---|---|",
        f"| OCR CER, all levels (n={sum(tr['ocr']['n_per_level'].values())}) | {tr['ocr']['cer']:.3f} | "
        f"{_fmt_range([b['ocr']['cer'] for b in base])} |",
    ]
    for level in lv:
        rows.append(f"| OCR CER, {level} (n={tr['ocr']['n_per_level'][level]}) | {tr['ocr']['per_level'][level]:.3f}"
                    f" | {_fmt_range([b['ocr']['per_level'].get(level, float('nan')) for b in base])} |")
    n_base = {b["video"]["n"] for b in base} - {tr["video"]["n"]}  # the untrained seeds may score a first part
    rows.append(f"| video QA accuracy (n={tr['video']['n']}"
                + "".join(f"; untrained n={n}" for n in n_base) + f", {tr['video']['mean_frames']:.1f} frames in "
                f"{tr['video']['mean_packages']:.1f} packages) | {tr['video']['accuracy']:.3f} | "
                f"{_fmt_range([b['video']['accuracy'] for b in base])} |")
    for task, acc in tr["video"]["per_task"].items():
        rows.append(f"| video QA, {task} | {acc:.3f} | "
                    f"{_fmt_range([b['video']['per_task'].get(task, float('nan')) for b in base])} |")
    rows += [
        "",
        f"Reading the OCR levels: *high* regions are fully masked, so their CER is what the model guesses without "
        f"seeing the text (its prior over the corpus and the page's layout). The gap between *low* "
        f"({tr['ocr']['per_level'].get('low', float('nan')):.3f}) and *high* "
        f"({tr['ocr']['per_level'].get('high', float('nan')):.3f}) is what the model reads from the pixels. "
        f"Pages: a title of random 3-5 words over the built-in corpus's vocabulary (a few hundred words; held-out "
        f"pages from another seed, {r['ocr_refs_seen_in_training']:.0%} of held-out references occur as a training "
        "target), typed like a typewriter tape one character per 14-px patch cell (14 per row, on 3 rows) in one "
        "of 4 monospace faces, then corrupted at one level; the question comes before the page. Before the "
        "report's stages the demo pre-trains its from-scratch parts, as the release starts from a pre-trained "
        "Qwen3 and SigLIP: `lm` trains the LLM on 'repeat the text' records, `vision` trains the tower and "
        "resampler to emit, per query, the LLM's embedding of the character in its cell. Why each of these "
        "(measured ablations) is in the docstrings of data/docs/grid.py, train/scratch.py, config.py (text_first) and recipes/demo.py (glyph_loss).",
        "",
        "## 3D vs 2D resampler at an equal token budget (one package per second of video)",
        "",
        "| frames per package | frames seen (mean) | packages (mean) | accuracy | 95% CI | minus packing 1 (paired, 95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    c = r["compare_3d_2d"]["packings"]
    for k in sorted(c, key=int):
        m = r["compare_3d_2d"]["minus_2d"].get(k)
        rows.append(f"| {k} | {c[k]['mean_frames']:.1f} | {c[k]['mean_packages']:.1f} | {c[k]['accuracy']:.3f} | "
                    f"{c[k]['ci95'][0]:.3f}-{c[k]['ci95'][1]:.3f} | "
                    + (f"{m['diff']:+.3f} ({m['ci95'][0]:+.3f} to {m['ci95'][1]:+.3f})" if m else "-") + " |")
    d = v["3d_vs_2d"]
    rows += [
        "",
        f"Same trained model, same held-out videos, every packing k at k fps so that each second of video is one "
        f"package (the first {r['plan']['videos_sweep']} held-out videos; 2D sees one frame a second, 3D k frames a "
        f"second for the same visual tokens). Packing {r['video_qa']['packing']} vs 1 per task (paired): " + ", ".join(
            f"{t} {x['diff']:+.2f} ({x['ci95'][0]:+.2f} to {x['ci95'][1]:+.2f})" for t, x in d["per_task"].items())
        + ".",
        "",
        f"![loss curves]({loss_png})",
        "",
        f"![metrics]({metrics_png})",
        "",
        "## Setup",
        "",
        "| stage | steps | trainable | schedule | peak lr | first loss | last loss |",
        "|---|---|---|---|---|---|---|",
    ]
    trainable = {"lm": "LLM (text only)", "vision": "vision + resampler (own loss)", "pt1": "resampler",
                 "pt2": "resampler + vision", "pt3": "everything", "sft": "everything", "video3d": "everything"}
    for stage, logs in r["history"].items():
        if logs:
            schedule = r["recipe"][stage]["schedule"].replace("wsd", "WSD")
            rows.append(f"| {stage} | {len(logs)} | {trainable.get(stage, '?')} | {schedule} | "
                        f"{plan['lr'][stage]:.0e} | {logs[0]['loss']:.3f} | {_tail(logs):.3f} |")
    rows += [
        "",
        f"Data: {plan['docs_train']} training pages ({plan['docs_eval']} held out, another seed), "
        f"{plan['images']} image QA, {plan['texts']} text QA, {plan['videos_train']} videos per video pool "
        f"({plan['videos_eval']} held out); pool sizes after processing: "
        + ", ".join(f"{k} {n}" for k, n in r["pool_sizes"].items()) + f". Each step packs about "
        f"{plan['batch_tokens']} tokens. Videos are one package per second: SFT one frame per package (2D), the "
        "2D->3D step a package size k in 1-6 per video at k fps. Evaluation is greedy (vlmcook.infer.engine).",
        "",
        "Examples (trained model, held-out):",
        "",
    ]
    for ex in tr["ocr"]["examples"]:
        ref, hyp = (" / ".join(x.split("\n")) for x in (ex["reference"], ex["output"]))
        rows.append(f"- OCR [{ex['level']}] reference `{ref}` -> output `{hyp}`")
    for ex in tr["video"]["examples"]:
        rows.append(f"- video [{ex['task']}] answer `{ex['answer']}` -> output `{ex['output']}`")
    return "\n".join(rows) + "\n"


def _tail(logs: list[dict], k: int = 10) -> float:
    """Mean loss of the last k steps (one step's loss is noisy: its batch is a random draw)."""
    tail = logs[-k:]
    return sum(m["loss"] for m in tail) / len(tail)


def write_report(results: dict, out_dir: str | Path, name: str) -> Path:
    """Write `<name>_loss.png`, `<name>_metrics.png` and `<name>.md` into out_dir; returns the markdown path."""
    out_dir = Path(out_dir)
    loss_png, metrics_png = f"{name}_loss.png", f"{name}_metrics.png"
    plot_losses(results["history"], out_dir / loss_png)
    plot_metrics(results, out_dir / metrics_png)
    path = out_dir / f"{name}.md"
    path.write_text(markdown(results, loss_png, metrics_png))
    return path


def summary(r: dict, out_dir: Path, report: Path) -> str:
    """The console summary of a run."""
    tr, v, d = r["trained"], r["verdict"], r["verdict"]["3d_vs_2d"]
    base_cer = [b["ocr"]["cer"] for b in r["untrained"]]
    base_acc = [b["video"]["accuracy"] for b in r["untrained"]]
    rng = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"  # noqa: E731
    return "\n".join([
        "",
        "=" * 78,
        f"vlmcook demo ({r['plan']['name']}) done in {r['timings']['total']:.0f} s wall, "
        f"{r['timings']['cpu']:.0f} s CPU ({r['params']:,} parameters)",
        f"  OCR CER        trained {tr['ocr']['cer']:.3f}   untrained {rng(base_cer)}   "
        f"-> {'LEARNED' if v['ocr']['learned'] else 'not learned'} (margin {v['ocr']['margin']:.2f})",
        "  CER per level  " + ", ".join(f"{k} {x:.3f}" for k, x in tr["ocr"]["per_level"].items())
        + f"   -> {'READS' if v['ocr']['reads'] else 'does NOT read'} (low {v['ocr']['low']:.3f} vs "
        f"{v['ocr']['low_other_page']:.3f} against other pages' text)",
        f"  video QA acc   trained {tr['video']['accuracy']:.3f}   untrained {rng(base_acc)}   chance "
        f"{tr['video']['chance']:.3f}   majority {v['video']['majority']:.3f}   "
        f"-> {'LEARNED' if v['video']['learned'] else 'not learned'}, "
        f"{'above' if v['video']['above_baselines'] else 'NOT above'} chance/majority "
        f"(every task: {'yes' if v['video']['every_task_above_baselines'] else 'NO'})",
        "  per task       " + ", ".join(f"{t} {x['accuracy']:.3f}" for t, x in v["video"]["tasks"].items()),
        f"  3D vs 2D, equal budget: packing {r['video_qa']['packing']} minus 1 = {d['diff']:+.3f} "
        f"(95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}) -> {d['verdict']}",
        f"  checkpoint: {out_dir / 'model'}  (vlmcook chat loads it by default from runs/demo/model)",
        f"  report:     {report}",
        "=" * 78,
    ])
