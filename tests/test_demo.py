"""The demo pipeline end to end at smoke scale (every stage, every eval, report, plots, checkpoint), and the real
`vlmcook demo --quick` run (slow)."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from vlmcook.checkpoint import load_model
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.demo import STAGES, run, smoke_config, smoke_plan


def _check_outputs(out, name, steps):
    model = load_model(out / "model")  # the released layout loads
    tok = Tokenizer.from_dir(out / "model")  # saved with its tokenizer
    assert tok.vocab_size <= model.config.llm.vocab_size
    r = json.loads((out / "metrics.json").read_text())
    assert list(r["history"]) == list(STAGES)
    for stage, logs in r["history"].items():
        assert len(logs) == steps[stage], stage
        assert all(math.isfinite(m["loss"]) for m in logs), stage
    for key in ("trained", "untrained"):
        for res in ([r[key]] if key == "trained" else r[key]):
            assert set(res["ocr"]["per_level"]) <= {"clean", "low", "medium", "high"}
            assert 0 <= res["video"]["accuracy"] <= 1
    c = r["compare_3d_2d"]
    # equal budget: the same number of packages, `packing` times the frames for 3D
    assert c["3d"]["mean_packages"] == c["2d"]["mean_packages"]
    assert c["3d"]["mean_frames"] > c["2d"]["mean_frames"]
    assert c["2d"]["mean_packages"] * model.config.query_num <= c["budget"]
    report = (out / f"{name}.md").read_text()
    for text in ("OCR CER", "3D vs 2D", "Verdicts", f"{name}_loss.png", f"{name}_metrics.png"):
        assert text in report
    for png in (f"{name}_loss.png", f"{name}_metrics.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200
    return model, r


def test_demo_smoke_end_to_end(tmp_path):
    plan = smoke_plan(steps=1)
    assert run(out=str(tmp_path), seed=0, plan=plan, config=smoke_config()) == 0
    model, r = _check_outputs(tmp_path, plan.name, plan.steps)
    # the checkpoint holds the *trained* weights: they differ from a fresh model of the same init seed
    from vlmcook.demo import untrained
    fresh = untrained(smoke_config(), 0).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_demo_quick_real(tmp_path):
    """The real `vlmcook demo --quick`: finishes in about 5 minutes and its pre-registered verdicts hold."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmcook.cli", "demo", "--quick", "--out", str(tmp_path)], check=True)
    wall = time.perf_counter() - t
    from vlmcook.demo import PLANS
    _, r = _check_outputs(tmp_path, PLANS["quick"].name, PLANS["quick"].steps)
    assert wall < 420, f"quick demo took {wall:.0f} s"
    assert r["verdict"]["ocr"]["learned"] and r["verdict"]["video"]["learned"], r["verdict"]
