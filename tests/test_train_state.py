"""Trainer state without pickle: what a step folder holds, the old pickle refused unread, the `latest` pointer kept
inside out_dir, and a tampered state (explicit cases and hypothesis mutations) refused with a CheckpointError or a
ResumeError, never another exception. Durability (fsync, orphans, kill -9) is in test_train_state_durability.py."""
import copy
import json
import os
import pickle
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vlmcook.checkpoint import CheckpointError
from vlmcook.config import MiniCPMVConfig
from vlmcook.train import common as C
from vlmcook.train import state as S
from vlmcook.train.loop import TrainConfig, train

from test_train_loop import make_batch, model

CFG = MiniCPMVConfig.from_name("tiny")


def train_cfg(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(stage="sft", steps=2, lr=1e-3, schedule="constant", out_dir=str(out), save_every=1,
                                 log_every=0), **kw})


def resume_parts(folder, cfg):
    """What the training loop does on resume, up to the first step: returns (model, optimizer)."""
    m = model(seed=7)
    C.set_trainable(m, cfg.stage)
    state = S.read_checkpoint(folder, cfg, m.config, C.Dist())
    S.load_model_state(folder, m)
    opt = C.make_optimizer(m, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    S.load_trainer_state(state, m, opt, C.Dist())
    return m, opt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = train_cfg(out)
    train(cfg, model(), [make_batch(0, B=1), make_batch(1, B=1)])
    return out, cfg


def test_step_folder_holds_safetensors_and_json_only(run):
    out, cfg = run
    folder = S.latest_checkpoint(out)
    assert folder.name == "step-2"
    names = sorted(p.name for p in folder.iterdir())
    assert S.STATE_NAME in names and S.STATE_TENSORS in names and S.LEGACY_STATE not in names
    for p in folder.iterdir():
        head = p.read_bytes()[:2]
        assert not head.startswith(b"\x80") and head != b"PK", f"{p.name} looks like a pickle / torch.save zip"
    meta = json.loads((folder / S.STATE_NAME).read_text())
    assert meta["step"] == 2 and meta["data_position"] == 2 and meta["world_size"] == 1
    tensors = load_file(folder / S.STATE_TENSORS)  # the safetensors library reads it: no vlmcook needed
    assert tensors["optimizer.resampler.query.exp_avg"].shape == (CFG.query_num, CFG.llm.hidden_size)
    assert tensors["rng.0.torch"].dtype == torch.uint8


def test_state_round_trips_exactly(run):
    out, cfg = run
    folder = out / "step-2"
    m, opt = resume_parts(folder, cfg)
    # The optimizer the loop had at step 2, rebuilt independently by continuing the uninterrupted run.
    ref = model()
    train(train_cfg(None, save_every=0, out_dir=None), ref, [make_batch(0, B=1), make_batch(1, B=1)])
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m.state_dict().values()))
    saved = load_file(folder / S.STATE_TENSORS)
    names = {id(p): n for n, p in m.named_parameters()}
    for p, st_ in opt.state.items():
        for k, v in st_.items():
            assert torch.equal(v, saved[f"optimizer.{names[id(p)]}.{k}"])
    assert all(g["betas"] == cfg.betas and isinstance(g["betas"], tuple) for g in opt.param_groups)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file: code from the checkpoint running
        return open, (self.marker, "w")


def test_old_pickle_state_is_refused_unread(run, tmp_path, monkeypatch, capsys):
    out, _ = run
    fake = tmp_path / "old"
    shutil.copytree(out / "step-1", fake / "step-1")
    (fake / "step-1" / S.STATE_NAME).unlink()
    (fake / "step-1" / S.STATE_TENSORS).unlink()
    marker = tmp_path / "pwned"
    with open(fake / "step-1" / S.LEGACY_STATE, "wb") as f:
        pickle.dump({"step": 1, "x": _Evil(str(marker))}, f)
    (fake / "latest").write_text("step-1")

    def forbidden(*a, **k):
        raise AssertionError("a pickle was opened")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    with pytest.raises(CheckpointError, match="trainer_state.pt: a trainer state in the old pickle format, which is "
                                              "never loaded .* --init .*step-1"):
        S.latest_checkpoint(fake)
    # The command line: one line on stderr, exit code 2.
    from vlmcook.cli import main
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1?"},
                                             {"role": "assistant", "content": "2"}]}) + "\n")
    code = main(["train", "--stage", "sft", "--preset", "tiny", "--data", str(data), "--out", str(fake),
                 "--steps", "2", "--resume", "--log-every", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "old pickle format" in err and "\n" not in err
    assert not marker.exists()


@pytest.mark.parametrize("content", ["../step-2", "step-2/../../x", "/etc", "", "step-2\nstep-1", "latest", "step-x"])
def test_latest_pointer_stays_in_out_dir(run, tmp_path, content):
    out, _ = run
    dst = tmp_path / "o"
    shutil.copytree(out, dst)
    (dst / "latest").write_text(content)
    with pytest.raises(CheckpointError, match="latest: names .* not a step folder"):
        S.latest_checkpoint(dst)


def test_latest_pointer_links_and_fifos_are_refused(run, tmp_path):
    out, _ = run
    dst = tmp_path / "o"
    shutil.copytree(out, dst)
    (tmp_path / "elsewhere").write_text("step-2")
    (dst / "latest").unlink()
    (dst / "latest").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="latest: checkpoint pointer is a link to a file outside"):
        S.latest_checkpoint(dst)
    (dst / "latest").unlink()
    os.mkfifo(dst / "latest")
    with pytest.raises(CheckpointError, match="latest: checkpoint pointer is not a regular file"):
        S.latest_checkpoint(dst)


# ---- tampered trainer states -----------------------------------------------------------------------------------
def _edit_json(folder, fn):
    path = folder / S.STATE_NAME
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _edit_tensors(folder, fn):
    path = folder / S.STATE_TENSORS
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, str(path))


def _set(d, keys, value):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


GROUP0 = ["optimizer", "param_groups", 0]
JSON_CASES = {
    "format": (lambda m: _set(m, ["format"], "other"), "not a trainer state of this version"),
    "negative step": (lambda m: _set(m, ["step"], -1), "field 'step' must be an integer >= 0"),
    "world size text": (lambda m: _set(m, ["world_size"], "1"), "field 'world_size' must be an integer >= 1"),
    "train config list": (lambda m: _set(m, ["train_config"], []), "field 'train_config' must be a JSON dict"),
    "python rng short": (lambda m: _set(m, ["rng", 0, "python", 1], [1, 2, 3]), "RNG state of rank 0 is malformed"),
    "python rng version": (lambda m: _set(m, ["rng", 0, "python", 0], 99), "RNG state of rank 0 is malformed"),
    "numpy rng key": (lambda m: _set(m, ["rng", 0, "numpy", "key"], [2**40]), "RNG state of rank 0 is malformed"),
    "two ranks": (lambda m: m["rng"].append(m["rng"][0]), "2 RNG states for 1 processes"),
    "param names": (lambda m: _set(m, GROUP0 + ["params"], "all"), "param_groups must be a list of objects"),
    "stray state": (lambda m: _set(m, GROUP0 + ["params"], []), "optimizer state for '.*', which no param group"),
    "scalars": (lambda m: _set(m, ["optimizer", "scalars"], {"x": {"step": "one"}}), "optimizer.scalars must map"),
    "hyperparameter": (lambda m: _set(m, GROUP0 + ["eps"], 0.5), "param group 0 has hyperparameter eps=0.5"),
    "unknown hyperparameter": (lambda m: _set(m, GROUP0 + ["momentum"], 0.9), "hyperparameter momentum=0.9"),
}
TENSOR_CASES = {
    "torch rng size": (lambda t: _set(t, ["rng.0.torch"], t["rng.0.torch"][:10].clone()),
                       "RNG state of rank 0 is malformed"),
    "missing torch rng": (lambda t: t.pop("rng.0.torch"), "RNG state of rank 0 is malformed"),
    "extra tensor": (lambda t: _set(t, ["x"], torch.zeros(1)), "unexpected tensor 'x'"),
    "exp_avg shape": (lambda t: _set(t, ["optimizer.resampler.query.exp_avg"], torch.zeros(3)),
                      "optimizer state 'exp_avg' is torch.float32 \\[3\\] for a parameter of shape \\[8, 64\\]"),
    "exp_avg ints": (lambda t: _set(t, ["optimizer.resampler.query.exp_avg"],
                                    t["optimizer.resampler.query.exp_avg"].long()),
                     "optimizer tensor 'optimizer.resampler.query.exp_avg' is torch.int64, not floating point"),
    "unknown parameter": (lambda t: _set(t, ["optimizer.llm.nope.weight.exp_avg"], torch.zeros(1)),
                          "optimizer state for 'llm.nope.weight', which no param group lists"),
}


@pytest.mark.parametrize("case", [*JSON_CASES, *TENSOR_CASES])
def test_tampered_state_is_refused_with_the_reason(run, tmp_path, case):
    out, cfg = run
    folder = tmp_path / "step-2"
    shutil.copytree(out / "step-2", folder)
    if case in JSON_CASES:
        edit, message = JSON_CASES[case]
        _edit_json(folder, edit)
    else:
        edit, message = TENSOR_CASES[case]
        _edit_tensors(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        resume_parts(folder, cfg)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):  # the first few of long lists (the 625 python RNG words) are enough
            yield from _paths(v, (*prefix, i))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def scratch_state(run, tmp_path_factory):
    out, _ = run
    folder = tmp_path_factory.mktemp("mut") / "step-2"
    shutil.copytree(out / "step-2", folder)
    return folder, json.loads((folder / S.STATE_NAME).read_text())


@settings(database=None, deadline=None, max_examples=60)
@given(data=st.data())
def test_mutated_state_json_resumes_or_raises_a_clear_error(run, scratch_state, data):
    _, cfg = run
    folder, original = scratch_state
    meta = copy.deepcopy(original)
    paths = [p for p in _paths(meta) if p]
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(paths))
        parent = meta
        try:
            for k in path[:-1]:
                parent = parent[k]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed this path
            pass
    (folder / S.STATE_NAME).write_text(json.dumps(meta))
    try:
        resume_parts(folder, cfg)
    except (CheckpointError, S.ResumeError):
        pass
