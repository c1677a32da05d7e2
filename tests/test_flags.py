"""Flags generated from dataclass fields (train/flags.py), the tokenizer fallback rule (Tokenizer.for_model) and
load_or_init. The flag tests use a toy dataclass built here, so they check the generator, not our configs."""

import argparse
import json
from dataclasses import dataclass

import pytest
import torch

from vlmcook.checkpoint import save_model
from vlmcook.config import MiniCPMVConfig
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.train import flags
from vlmcook.train.common import load_or_init
from vlmcook.train.flags import opt


@dataclass(frozen=True)
class Toy:
    steps: int = opt(5, "how many steps")
    lr: float | None = opt(None, "learning rate")
    mode: str = opt("a", "a mode", choices=("a", "b"))
    fast: bool = opt(False, "go fast")
    out_dir: str | None = opt(None, "where to write", flag="out", required=True)
    files: tuple[str, ...] = opt((), "input files", action="append")
    hidden: float = 0.5  # Python-only: no flag

    def __post_init__(self):
        flags.check_choices(self)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    flags.add_flags(p, Toy, default_text={"lr": "default: per stage"})
    return p


def values(argv, p=None):
    return flags.values((p or parser()).parse_args(argv), Toy)


def test_flags_follow_the_fields(capsys):
    p = parser()
    got = values(["--steps", "7", "--lr", "0.1", "--mode", "b", "--fast", "--out", "o", "--files", "x",
                  "--files", "y"], p)
    assert got == {"steps": 7, "lr": 0.1, "mode": "b", "fast": True, "out_dir": "o", "files": ("x", "y")}
    assert flags.build(Toy, got) == Toy(7, 0.1, "b", True, "o", ("x", "y"))
    assert values(["--out", "o"]) == {"out_dir": "o"}  # only what was given: the dataclass keeps its defaults
    assert flags.build(Toy, {"out_dir": "o"}) == Toy(out_dir="o")
    with pytest.raises(SystemExit):
        p.parse_args(["--hidden", "1"])
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "many"])
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--steps N how many steps (default: 5)" in out
    assert "--lr X learning rate (default: per stage)" in out
    assert "--out OUT_DIR" not in out and "where to write (required)" in out
    assert "--fast go fast" in out and "(default: False)" not in out
    assert "--config FILE.json" in out and "hidden" not in out


def test_config_file_layers_under_the_command_line(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"steps": 3, "lr": 2, "mode": "b", "out": "o", "files": ["f"], "fast": True}))
    got = values(["--config", str(cfg), "--steps", "9"])
    assert got == {"steps": 9, "lr": 2.0, "mode": "b", "out_dir": "o", "files": ("f",), "fast": True}
    assert isinstance(got["lr"], float)  # a JSON int is a valid float, stored as one
    cfg.write_text(json.dumps({"lr": None, "Steps": 1}))
    with pytest.raises(ValueError, match="unknown key 'Steps'"):
        values(["--config", str(cfg)])


@pytest.mark.parametrize("content, message", [
    ({"steps": "ten"}, "key 'steps' must be int, got 'ten'"),
    ({"steps": True}, "key 'steps' must be int, got True"),
    ({"steps": 2.5}, "key 'steps' must be int, got 2.5"),
    ({"fast": 1}, "key 'fast' must be bool, got 1"),
    ({"files": "f"}, "key 'files' must be a list of str, got 'f'"),
    ({"files": ["f", 2]}, "key 'files' must be a list of str"),
    ({"stepz": 1}, "unknown key 'stepz'"),
    ([1, 2], "must hold a JSON object"),
])
def test_config_file_errors_name_the_key(tmp_path, content, message):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        values(["--config", str(cfg), "--out", "o"])


def test_config_file_and_required_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        values(["--config", str(tmp_path / "nope.json")])
    (tmp_path / "bad.json").write_text("{steps: 1}")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        values(["--config", str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match="--out is required"):
        values(["--steps", "1"])
    with pytest.raises(ValueError, match=r"Toy: mode='c' is not one of \('a', 'b'\)"):
        Toy(mode="c")


# ---- the tokenizer fallback rule and load_or_init ----------------------------------------------------------------
TINY = MiniCPMVConfig.from_name("tiny")


def test_tokenizer_for_model(tmp_path):
    chars = Tokenizer.tiny(chars=True)
    chars.save(tmp_path / "own")
    text = "hello world"
    assert Tokenizer.for_model(tmp_path / "own", 512).encode(text) == chars.encode(text)  # the folder's own files
    assert chars.encode(text) != Tokenizer.tiny().encode(text)  # (so the line above can tell them apart)
    (tmp_path / "bare").mkdir()
    assert Tokenizer.for_model(tmp_path / "bare", 512).encode(text) == Tokenizer.tiny().encode(text)
    assert Tokenizer.for_model(None, 512).encode(text) == Tokenizer.tiny().encode(text)
    with pytest.raises(FileNotFoundError, match=r"bare: no tokenizer files .* vocab_size 600 does not match"):
        Tokenizer.for_model(tmp_path / "bare", 600)
    with pytest.raises(FileNotFoundError, match="no tokenizer folder given and the model's vocab_size 600"):
        Tokenizer.for_model(None, 600)


def test_load_or_init_preset_and_checkpoint(tmp_path):
    torch.manual_seed(3)
    expect = MiniCPMV(TINY).state_dict()
    model, tok = load_or_init(preset="tiny", seed=3)
    assert all(torch.equal(v, expect[k]) for k, v in model.state_dict().items())
    assert tok.vocab_size == TINY.llm.vocab_size == 512
    save_model(model, tmp_path / "ckpt", tokenizer=Tokenizer.tiny(chars=True))
    again, tok2 = load_or_init(init=tmp_path / "ckpt")
    assert all(torch.equal(v, expect[k]) for k, v in again.state_dict().items())
    assert tok2.encode("hello") == Tokenizer.tiny(chars=True).encode("hello")  # the checkpoint's own tokenizer
    Tokenizer.tiny().save(tmp_path / "bpe")
    _, tok3 = load_or_init(init=tmp_path / "ckpt", tokenizer=tmp_path / "bpe")
    assert tok3.encode("hello") == Tokenizer.tiny().encode("hello")  # an explicit folder wins
    assert next(load_or_init(preset="tiny", dtype="bfloat16")[0].parameters()).dtype == torch.bfloat16


def test_load_or_init_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of init"):
        load_or_init()
    with pytest.raises(ValueError, match="exactly one of init"):
        load_or_init(init=tmp_path, preset="tiny")
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        load_or_init(init=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_or_init(preset="huge")
