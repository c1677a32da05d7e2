"""2 gloo processes under torchrun (DDP and FSDP2) == 1 process on the same global batch; FSDP2 resume is exact.

Rank r takes micro-batch `2*step + r` of a fixed list; the single process takes both with grad_accum=2. Rank 0's
micro-batches hold images and rank 1's are text-only, so the dummy-view path (common.add_dummy_visual) is what keeps
DDP's reducer and FSDP2's collectives in step. The loss is token-weighted over the global step, so in exact arithmetic
the gradients are identical; the only differences are float summation orders (all-reduce vs local accumulation).

Tolerance: losses rel 1e-5, weights abs 1e-6 after 2 steps with AdamW eps=1. With eps=1 the update
lr*m/(sqrt(v)+eps) is ~linear in the gradient (|g| << 1), so weight differences are lr * (gradient rounding noise,
~1e-7 relative) ~ 1e-9 (measured: 1e-12 DDP, 4e-9 FSDP2); 1e-6 leaves margin for the clip coefficient and 2
compounding steps, while a wrong reduction (each rank's mean averaged regardless of its token count, here 11 vs 22
label tokens) moves weights by ~1e-4 (1.4e-4 measured for the accumulation analogue in test_train_loop). The default eps=1e-8 makes the first Adam step ~lr*sign(g): float noise on gradients that are ~0 flips it, so weights
would only agree to ~lr.

This file is also the torchrun worker (`python -m torch.distributed.run ... tests/test_distributed.py OUT TASK...`).
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vlmcook.checkpoint import load_model  # noqa: E402
from vlmcook.config import MiniCPMVConfig  # noqa: E402
from vlmcook.model.minicpmv import MiniCPMV  # noqa: E402
from vlmcook.train import common as C  # noqa: E402
from vlmcook.train.loop import TrainConfig, train  # noqa: E402
from test_train_loop import make_batch  # noqa: E402

STEPS = 2
MICRO = [make_batch(10 + i, B=2 if i % 2 == 0 else 1, views=i % 2 == 0) for i in range(2 * STEPS)]


def config(mode: str, out: Path, accum: int) -> TrainConfig:
    return TrainConfig(stage="pt3", steps=STEPS, lr=1e-3, min_lr=1e-4, schedule="wsd", warmup_frac=0.0,
                       decay_frac=0.5, clip=1.0, eps=1.0, grad_accum=accum, dist=mode, out_dir=str(out),
                       log_every=0)


def fresh_model() -> MiniCPMV:
    torch.manual_seed(0)
    return MiniCPMV(MiniCPMVConfig.from_name("tiny"))


def worker(out: Path, tasks: list[str]) -> None:
    torch.set_num_threads(1)
    dist = C.setup_distributed("cpu")
    batches = lambda pos: (MICRO[(pos * dist.world_size + dist.rank) % len(MICRO)] for pos in range(pos, 10**9))
    for mode in ("ddp", "fsdp"):
        if mode in tasks:
            hist = train(config(mode, out / mode, 1), fresh_model(), batches, dist=dist)
            if dist.is_main:
                (out / mode / "losses.json").write_text(json.dumps(hist))
    if "resume" in tasks:
        resume_worker(out, dist, batches)
    C.cleanup_distributed()


def resume_worker(out: Path, dist, batches) -> None:
    """FSDP resume: stop after step 1 (checkpointed), resume from a different init, finish."""
    half = replace(config("fsdp", out / "fsdp_half", 1), save_every=1)
    try:
        train(half, fresh_model(), batches, dist=dist, on_step=_stop_after_first)
    except _Stop:
        pass
    torch.manual_seed(99)
    rest = train(replace(half, resume=True), MiniCPMV(MiniCPMVConfig.from_name("tiny")), batches, dist=dist)
    if dist.is_main:
        (out / "fsdp_half" / "losses.json").write_text(json.dumps(rest))


class _Stop(Exception):
    pass


def _stop_after_first(step, metrics):
    if step == 0:
        raise _Stop


def torchrun(out: Path, *tasks: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(out), *tasks]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]


def test_two_gloo_processes_match_one_process(tmp_path):
    torchrun(tmp_path, "ddp", "fsdp")

    ref_model = fresh_model()
    ref = train(config("none", tmp_path / "single", 2), ref_model, MICRO)
    ref_w = ref_model.state_dict()
    for mode in ("ddp", "fsdp"):
        got = json.loads((tmp_path / mode / "losses.json").read_text())
        assert got == pytest.approx(ref, rel=1e-5), mode
        w = load_model(tmp_path / mode / f"step-{STEPS}").state_dict()  # FSDP: gathered full state on rank 0
        diff = max((w[k] - ref_w[k]).abs().max().item() for k in ref_w)
        print(f"{mode}: max |loss diff| {max(abs(a - b) for a, b in zip(got, ref)):.2e}, max |weight diff| {diff:.2e}")
        assert diff < 1e-6, (mode, diff)


@pytest.mark.slow
def test_fsdp_resume_is_exact(tmp_path):
    """FSDP2 resume after step 1 is bit-identical to the uninterrupted FSDP2 run (gathered optimizer state)."""
    torchrun(tmp_path, "fsdp", "resume")
    full = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    assert json.loads((tmp_path / "fsdp_half" / "losses.json").read_text()) == full[1:]
    a = load_model(tmp_path / "fsdp" / f"step-{STEPS}").state_dict()
    b = load_model(tmp_path / "fsdp_half" / f"step-{STEPS}").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
