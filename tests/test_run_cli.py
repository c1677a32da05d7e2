"""`vlmcook train` and `vlmcook rl` through `cli.main`: a CLI run equals the same run written in Python (same losses,
same weights), per-stage defaults apply when a flag is not given, bad flags and config files are one-line errors
with exit code 2, and --help shows the defaults. Oracle for the stage defaults: the report's numbers, typed here."""

import json

import pytest
import torch

from vlmcook import cli
from vlmcook.checkpoint import load_model
from vlmcook.config import MiniCPMVConfig
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.train import cli as train_cli
from vlmcook.train.data import JsonlSource, Mixture, collate_batch
from vlmcook.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("run_cli") / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{i} plus one?"}, {"role": "assistant", "content": f"{i + 1}"}]}
            for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def spy(monkeypatch):
    """Records the TrainConfig and the losses of every train() the CLI runs."""
    seen = []

    def recording_train(cfg, model, batches, **kw):
        history = train(cfg, model, batches, **kw)
        seen.append((cfg, history))
        return history
    monkeypatch.setattr(train_cli, "train", recording_train)
    return seen


def test_cli_run_equals_the_python_run(data, tmp_path, capsys, spy):
    argv = ["train", "--stage", "pt3", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "cli"),
            "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--log-every", "0"]
    assert run(argv, capsys)[0] == 0
    (cli_cfg, cli_losses), = spy
    # The same run in Python: the documented API, batches built by hand from the mixture (one process).
    cfg = TrainConfig(stage="pt3", steps=3, batch_size=2, lr=1e-3, log_every=0, out_dir=str(tmp_path / "py"))
    assert cli_cfg == TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "cli")})
    assert (cfg.schedule, cfg.min_lr) == ("wsd", 1e-5)  # pt3's defaults filled what the flags left out
    torch.manual_seed(0)
    model, tok = MiniCPMV(MiniCPMVConfig.from_name("tiny")), Tokenizer.tiny()
    it = Mixture([(JsonlSource(data, tok, model.config), 1.0)], seed=0).iterate()
    batches = [collate_batch([next(it)[1] for _ in range(2)], tok.pad_id) for _ in range(3)]
    assert train(cfg, model, batches) == cli_losses
    saved = load_model(tmp_path / "cli" / "step-3").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_config_file_with_flags_winning(data, tmp_path, capsys, spy):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"stage": "sft", "preset": "tiny", "data": [str(data)], "out": str(tmp_path / "o"),
                               "steps": 5, "min-lr": 0, "log_every": 0, "save_every": 1}))
    assert run(["train", "--config", str(cfg), "--steps", "1"], capsys)[0] == 0
    got = spy[0][0]
    assert (got.steps, got.min_lr, got.save_every, got.lr, got.schedule) == (1, 0.0, 1, 1e-5, "cosine")


@pytest.mark.parametrize("flags, message", [
    (["--steps", "-1"], "TrainConfig: steps=-1, grad_accum=1 and batch_size=1 must be >= 1"),
    (["--lr", "1e-7"], "need 0 <= min_lr <= lr, got min_lr=1e-05, lr=1e-07"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
    (["--init", "nowhere"], "exactly one of init"),
])
def test_bad_flags_are_one_line_errors(data, tmp_path, capsys, flags, message):
    argv = ["train", "--stage", "pt1", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "o"), *flags]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("vlmcook train: error: ") and message in err


@pytest.mark.parametrize("content, message", [
    ({"stepz": 1}, "unknown key 'stepz'"),
    ({"steps": "ten"}, "key 'steps' must be int, got 'ten'"),
    ({"stage": "pt9"}, "stage='pt9' is not one of"),
])
def test_bad_config_files_are_one_line_errors(data, tmp_path, capsys, content, message):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(content))
    argv = ["train", "--config", str(cfg), "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "o")]
    if "stage" not in content:
        argv += ["--stage", "pt1"]
    code, _, err = run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_required_flags(data, tmp_path, capsys):
    code, _, err = run(["train", "--stage", "pt1", "--preset", "tiny", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--data is required" in err
    code, _, err = run(["rl", "--preset", "tiny", "--data", str(data)], capsys)
    assert code == 2 and "--out is required" in err


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    # The report: pre-training peak 5e-5 -> floor 1e-5 (WSD), SFT 1e-5 -> 1e-6 (cosine), video3d 5e-6 -> 1e-6.
    assert "peak learning rate (default per stage: lm/sft 1e-05, pt1/pt2/pt3 5e-05, video3d 5e-06)" in out
    assert "(default per stage: lm/sft/video3d 1e-06, pt1/pt2/pt3 1e-05)" in out
    assert "(default per stage: lm/pt1/pt2/pt3 wsd, sft/video3d cosine)" in out
    assert "--steps N optimizer steps (default: 1000)" in out and "--config FILE.json" in out
    with pytest.raises(SystemExit):
        cli.main(["rl", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens N response length limit of a rollout sample, in tokens (default: 256)" in out
    assert "--lr X learning rate, constant as in the paper (default: 1e-06)" in out
    assert "lead" not in out
