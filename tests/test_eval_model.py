"""`vlmcook eval` on a tiny random-weight checkpoint saved in the released layout: the CLI end to end, batch 1 vs
batch 2 (same greedy answers), the model's own errors kept per sample, and Video-MME at two packings, whose visual
tokens per sample must equal the processor's header-only accounting (`ChatModel.count_tokens`). No test relies on
what the random model says."""

import base64
import json

import pytest
import torch

from test_eval_tasks import MCQ_HEADER, b64, mcq_tsv, png, videomme_dir, write_tsv
from vlmcook.checkpoint import save_model
from vlmcook.cli import main
from vlmcook.config import MiniCPMVConfig
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.infer.api import ChatModel
from vlmcook.model.minicpmv import MiniCPMV


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_model")
    torch.manual_seed(0)
    save_model(MiniCPMV(MiniCPMVConfig.from_name("tiny")), root / "model", tokenizer=Tokenizer.tiny())
    return root / "model"


def _eval(*args) -> int:
    return main(["eval", *map(str, args)])


def _preds(out):
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def test_cli_mcq_batches_agree(model_dir, tmp_path, capsys):
    data = mcq_tsv(tmp_path / "m.tsv")
    with open(data, "a") as f:  # valid base64 of bytes that are no image: the model's own error, per sample
        f.write("\t".join(map(str, [5, base64.b64encode(b"not an image " * 8).decode(), "Q?", "", "x", "y", "", "A",
                                    "broken", "test"])) + "\n")
    for b in (1, 2):
        assert _eval("--task", "mcq", "--data", data, "--model", model_dir, "--out", tmp_path / f"b{b}",
                     "--batch-size", b, "--max-new-tokens", 5) == 0
    assert "accuracy (%)" in capsys.readouterr().out
    one, two = _preds(tmp_path / "b1"), _preds(tmp_path / "b2")
    assert [r["output"] for r in one] == [r["output"] for r in two]  # greedy: batching changes nothing
    scores = json.loads((tmp_path / "b2" / "scores.json").read_text())
    assert (scores["n"], scores["errors"]) == (6, 3)
    bad = {r["id"]: r for r in two}
    assert bad["5"]["error_stage"] == "generate" and "image" in bad["5"]["error"].lower()
    assert bad["4"]["error_stage"] == "data" and bad["3"]["error_stage"] == "data"
    ok = [r for r in two if r["error"] is None]
    assert all(r["usage"]["visual_tokens"] > 0 and r["usage"]["generated_tokens"] <= 5 for r in ok)
    assert all(r["seconds"]["prefill"] > 0 for r in ok)
    assert scores["efficiency"]["peak_memory"]["cpu_peak_rss_mb"] > 0


def test_videomme_packing_accounting(model_dir, tmp_path, capsys):
    folder = videomme_dir(tmp_path / "vmme", "parquet")
    cm = ChatModel.load(model_dir)
    visual = {}
    for p in (1, 2):
        out = tmp_path / f"p{p}"
        assert _eval("--task", "videomme", "--data", folder, "--model", model_dir, "--out", out, "--video-packing",
                     p, "--video-fps", 6, "--max-new-tokens", 3) == 0
        rec = next(r for r in _preds(out) if r["id"] == "001-1")
        msgs = [{"role": "user", "content": [{"type": "video", "video": str(folder / "data" / "clipA.mp4")}, "q"]}]
        want = cm.count_tokens(msgs, packing=p, fps=6).visual_tokens  # from the video's header alone
        assert rec["usage"]["visual_tokens"] == want
        visual[p] = want
    assert visual[1] == 6 * 8 and visual[2] == 3 * 8  # 6 frames at 6 fps: 6 packages of 1, 3 of 2; 8 queries each
    capsys.readouterr()
    assert _eval("--compare", tmp_path / "p1", tmp_path / "p2") == 0
    table = capsys.readouterr().out
    assert "packing=1" in table and "packing=2" in table and "| 48.0 |" in table and "| 24.0 |" in table


def test_jsonl_with_video_record(model_dir, tmp_path):
    folder = videomme_dir(tmp_path / "v", "jsonl")  # for its mp4
    rec = {"id": "v1", "videos": [{"path": "data/clipA.mp4", "fps": 3, "packing": 3}],
           "messages": [{"role": "user", "content": "(<video>./</video>)\nWhat colour?"},
                        {"role": "assistant", "content": "blue"}]}
    (folder / "mine.jsonl").write_text(json.dumps(rec) + "\n")
    assert _eval("--task", "jsonl", "--data", folder / "mine.jsonl", "--model", model_dir, "--out",
                 tmp_path / "j", "--max-new-tokens", 3) == 0
    r = _preds(tmp_path / "j")[0]
    assert r["error"] is None and r["usage"]["visual_tokens"] == 1 * 8  # 3 frames at 3 fps in one package
    assert r["verifier"] == "string" and r["answer"] == "blue"


def test_image_rows_reach_the_model_as_drawn(model_dir, tmp_path):
    """The TSV's base64 image is what the processor gets: the prompt's visual tokens match a direct count."""
    data = write_tsv(tmp_path / "one.tsv", MCQ_HEADER, [[0, b64(png(size=(300, 120))), "Q?", "", "a", "b", "", "A",
                                                         "c", "dev"]])
    assert _eval("--task", "mcq", "--data", data, "--model", model_dir, "--out", tmp_path / "o",
                 "--max-new-tokens", 2) == 0
    r = _preds(tmp_path / "o")[0]
    cm = ChatModel.load(model_dir)
    want = cm.count_tokens([{"role": "user", "content": [{"type": "image", "image": png(size=(300, 120))}, "x"]}])
    assert r["usage"]["visual_tokens"] == want.visual_tokens
