"""The unified-vs-parser ablation recipe: its statistics in the default set, the smoke run end to end (slow)."""

import json
import math

import pytest

from recipes.unified_vs_parser import ARMS, RULE, Rule, cer_of, paired_diff, qa_parts, smoke_plan, verdicts


def test_paired_diff_interval_covers_a_known_difference():
    # three seeds, 200 items each: unified right on 60% of items, parser on 40%, independently per item
    import random

    rng = random.Random(0)
    per_seed = [([[rng.random() < 0.6] for _ in range(200)], [[rng.random() < 0.4] for _ in range(200)])
                for _ in range(3)]
    d = paired_diff(per_seed, qa_parts, Rule(resamples=2000))
    assert d["ci95"][0] < d["diff"] < d["ci95"][1]
    assert 0.1 < d["ci95"][0] and d["ci95"][1] < 0.3  # 0.2 +- ~2 x sqrt(2 x 0.24 / 600)


def test_verdicts_follow_the_rule():
    import random

    rng = random.Random(0)

    def seed(u_acc, p_acc, u_cer, p_cer, n=100):
        def arm(a, c):  # right on a random share `a` of the items; CER c on every page
            return {"kqa": [[rng.random() < a] * 2 for _ in range(n)], "docqa": [[rng.random() < a] * 2 for _ in
                                                                                 range(n)],
                    "ocr": [(round(c * 10), 10, "low")] * n}
        return {"unified": arm(u_acc, u_cer), "parser": arm(p_acc, p_cer)}
    res = {str(s): seed(0.60, 0.60, 0.10, 0.50, n=1000) for s in range(3)}
    v = verdicts(res, [{"kqa": 0.15, "docqa": 0.15}] * 3, Rule(resamples=500))
    assert v["kqa"]["verdict"] == "at least as good" and v["ocr"]["verdict"] == "better"
    assert v["paper_direction"] and v["kqa"]["arms"]["parser"]["learned"]
    res = {str(s): seed(0.30, 0.60, 0.50, 0.50) for s in range(3)}
    v = verdicts(res, [{"kqa": 0.15, "docqa": 0.15}] * 3, Rule(resamples=500))
    assert v["kqa"]["verdict"] == "worse" and v["ocr"]["verdict"] == "tie" and not v["paper_direction"]
    assert cer_of([(1, 4, "low"), (3, 4, "high")], "high") == 0.75
    assert RULE.margin == 0.05 and RULE.ocr_margin == 0.05  # pre-registered: a change must show in review


@pytest.mark.slow
def test_smoke_ablation_end_to_end(tmp_path):
    from recipes.demo import smoke_config
    from recipes.unified_vs_parser import run

    r = run(out=str(tmp_path / "run"), plan=smoke_plan(), report_dir=str(tmp_path), config=smoke_config())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"0", "1"}
    for seed in metrics["results"].values():
        assert set(seed) == set(ARMS) | {"init", "kqa_broken"}
        for arm in (seed[a] for a in ARMS + ("init",)):
            assert arm["kqa"] and arm["docqa"] and arm["ocr"]
    for seed in r["train"].values():  # equal steps; tokens per step within one sample of each other
        assert all(len(seed["losses"][a]) == smoke_plan().arm_steps for a in ARMS)
        assert all(math.isfinite(x) for a in ARMS for x in seed["losses"][a])
    order = r["checks"]["0"]["order"]["total"]
    assert order["pages"] == len(list((tmp_path / "run" / "data" / "seed0" / "parser" / "samples.jsonl")
                                      .read_text().splitlines()))
    report = (tmp_path / "unified_vs_parser_smoke.md").read_text()
    for text in ("Pre-registered rule", "Verdicts", "parser misorders", "Tesseract CER", "unified_vs_parser_smoke.png"):
        assert text in report
    assert (tmp_path / "unified_vs_parser_smoke.png").stat().st_size > 10_000
