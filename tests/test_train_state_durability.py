"""Durable checkpoints: everything fsync'd before `latest` moves, a crashed save's leftovers removed (only ours),
and a process killed with SIGKILL before any of the save's durability operations leaves a loadable `latest` from
which the resumed run is bit-identical to an uninterrupted one."""
import os
import signal
import subprocess
from dataclasses import replace

import pytest
import torch

from vlmcook.checkpoint import save_model
from vlmcook.train import state as S
from vlmcook.train.loop import TrainConfig, train

from test_train_loop import make_batch, model

OPS = ("fsync", "rename", "replace")  # the operations that make a save durable or visible
BATCHES = [make_batch(i, B=1) for i in range(3)]


def cfg_for(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(stage="sft", steps=3, lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_frac=0.0,
                                 out_dir=str(out), save_every=1, log_every=0), **kw})


def _path(x) -> str:
    return os.path.realpath(os.readlink(f"/proc/self/fd/{x}") if isinstance(x, int) else x)


def record(monkeypatch, events: list, active: list) -> None:
    """Log every fsync / rename / replace (with real paths) while active[0] is true."""
    for name in OPS:
        real = getattr(os, name)

        def hooked(*a, _real=real, _name=name, **k):
            if active[0]:
                events.append((_name, *map(_path, a[:2])))
            return _real(*a, **k)
        monkeypatch.setattr(os, name, hooked)


def test_everything_is_fsynced_before_latest_moves(tmp_path, monkeypatch):
    out = tmp_path / "run"
    events, active = [], [False]
    record(monkeypatch, events, active)

    def after_first_save(step, metrics):
        active[0] = step == 0  # record the second save only
    train(cfg_for(out, steps=2, lora=True, lora_r=2, lora_alpha=4, lora_dropout=0.0), model(), BATCHES,
          on_step=after_first_save)
    out, final = os.path.realpath(out), os.path.realpath(out / "step-2")
    tmp = os.path.join(out, ".step-2.tmp")
    moved = events.index(("rename", tmp, final))
    synced = {e[1] for e in events[:moved] if e[0] == "fsync"}
    written = {os.path.join(d, f).replace(final, tmp, 1) for d, _, fs in os.walk(final) for f in fs}
    folders = {d.replace(final, tmp, 1) for d, _, _ in os.walk(final)}
    assert len(written) >= 8 and any("merged" in f for f in written)  # shards, index, config, state, adapters, merged
    assert written | folders <= synced, sorted((written | folders) - synced)
    latest = events.index(("replace", os.path.join(out, ".latest.tmp"), os.path.join(out, "latest")))
    assert ("fsync", out) in events[moved:latest]  # the rename is on disk before `latest` names the folder
    assert ("fsync", os.path.join(out, ".latest.tmp")) in events[moved:latest]
    assert events[latest + 1:] == [("fsync", out)]


LEFTOVERS = [".step-3.tmp", ".step-1.old", "..step-4.tmp.tmp-4242"]  # folders a crash can leave (the last: old code)
KEPT = [".step-3.tmpx", "notes", ".hidden", "step-9x"]


def _litter(out) -> None:
    for name in LEFTOVERS + KEPT:
        (out / name).mkdir(parents=True)
        (out / name / "shard.safetensors").write_bytes(b"x" * 100)
    (out / ".latest.tmp").write_text("step-3")


def test_crash_leftovers_are_removed_on_resume_and_on_save(tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(out, steps=1)
    train(cfg, model(), BATCHES)
    _litter(out)
    assert S.latest_checkpoint(out).name == "step-1"  # resume entry point
    assert sorted(p.name for p in out.iterdir()) == sorted(KEPT + ["latest", "step-1"])
    _litter(out / "other")
    train(cfg_for(out / "other", steps=1), model(), BATCHES)  # a save into a littered out_dir, no resume
    assert sorted(p.name for p in (out / "other").iterdir()) == sorted(KEPT + ["latest", "step-1"])


def test_save_model_removes_only_leftovers_of_dead_processes(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        for name in (f".m.tmp-{dead.pid}", f".m.old-{dead.pid}", f".m.tmp-{alive.pid}", f".mm.tmp-{dead.pid}"):
            (tmp_path / name).mkdir()
        save_model(model(), tmp_path / "m")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", f".m.tmp-{alive.pid}",
                                                                      f".mm.tmp-{dead.pid}"])
    finally:
        alive.kill()
        alive.wait()


def test_failed_save_keeps_latest_and_its_leftovers_go_on_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = cfg_for(out)
    real = S.save_file

    def disk_full(tensors, path, *a, **k):
        if "step-3" in str(path):
            raise OSError("disk full")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(S, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, model(), BATCHES)
    assert (out / ".step-3.tmp").is_dir() and not (out / "step-3").exists()
    monkeypatch.undo()
    assert S.latest_checkpoint(out).name == "step-2" and not (out / ".step-3.tmp").exists()


# ---- SIGKILL at every durability operation of the saves ---------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: losses, final weights, and how many durability operations its saves make."""
    out = tmp_path_factory.mktemp("ref") / "run"
    count, real = [0], {name: getattr(os, name) for name in OPS}

    def counting(name):
        def f(*a, **k):
            count[0] += 1
            return real[name](*a, **k)
        return f
    for name in OPS:
        setattr(os, name, counting(name))
    try:
        m = model()
        losses = train(cfg_for(out), m, BATCHES)
    finally:
        for name in OPS:
            setattr(os, name, real[name])
    return losses, {k: v.clone() for k, v in m.state_dict().items()}, count[0]


def _killed_run(out, kill_at: int) -> int:
    """Train in a forked child that SIGKILLs itself right before its `kill_at`-th durability operation."""
    pid = os.fork()
    if pid == 0:
        try:
            count = [0]
            for name in OPS:
                def f(*a, _real=getattr(os, name), **k):
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(*a, **k)
                setattr(os, name, f)
            train(cfg_for(out), model(), BATCHES)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def _check_kill(reference, out, kill_at: int) -> None:
    losses, weights, _ = reference
    status = _killed_run(out, kill_at)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    folder = S.latest_checkpoint(out)  # loadable or absent; leftovers removed
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    start = 0 if folder is None else int(folder.name.removeprefix("step-"))
    resumed = model(seed=0 if folder is None else 123)  # from a checkpoint, everything must come from it
    rest = train(replace(cfg_for(out), resume=True), resumed, BATCHES)
    assert rest == losses[start:], f"kill before operation {kill_at}: resumed from step {start}"
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in weights.items())


def test_kill_during_save_leaves_a_loadable_latest(reference, tmp_path):
    total = reference[2]
    per_save = total // 3
    # The first operation, the middle of the second save, its last operation before `latest` moves, the last one.
    for kill_at in sorted({1, per_save + per_save // 2, 2 * per_save - 1, total}):
        _check_kill(reference, tmp_path / f"k{kill_at}", kill_at)


@pytest.mark.slow
def test_kill_at_every_durability_operation(reference, tmp_path):
    """33 operations (11 per save), ~30 s."""
    for kill_at in range(1, reference[2] + 1):
        _check_kill(reference, tmp_path / f"k{kill_at}", kill_at)
