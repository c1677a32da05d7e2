"""Training loop: schedules at hand-computed points, which tensors each stage changes, loss going down, token-weighted
accumulation, the text-only dummy view, resume identity, crash-safe `latest`, resume mismatch errors."""

import math
from dataclasses import replace

import pytest
import torch

from vlmcook.config import MiniCPMVConfig
from vlmcook.data.processor import Processor, collate
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.train import common as C
from vlmcook.train import state as S
from vlmcook.train.loop import TrainConfig, lr_at, train

CFG = MiniCPMVConfig.from_name("tiny")


def make_batch(seed: int, B: int = 2, T: int = 24, views: bool = True) -> dict:
    """Random ids with an 8-token visual span [2, 10) per sample (tiny query_num = 8) and labels on the tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 500, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if views:
        b["pixel_values"] = [[torch.rand(3, 28, 42, generator=g) * 2 - 1] for _ in range(B)]
        b["temporal_ids"] = [[[-1]] for _ in range(B)]
        b["image_bound"] = [torch.tensor([[2, 10]]) for _ in range(B)]
    return b


def model(seed: int = 0) -> MiniCPMV:
    torch.manual_seed(seed)
    return MiniCPMV(CFG)


def weights(m) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---- schedules ------------------------------------------------------------------------------------------------
def test_wsd_values_by_hand():
    # 10 steps, warmup 2, decay 2, peak 1, floor 0.25: 0.5, 1, 1 x6, then 0.25^(1/2) = 0.5, 0.25.
    exp = [C.wsd_lr(s, 10, 1.0, 0.25, 2, 2, "exp") for s in range(10)]
    assert exp == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 0.5, 0.25])
    lin = [C.wsd_lr(s, 10, 1.0, 0.25, 2, 2, "linear") for s in range(8, 10)]
    assert lin == pytest.approx([0.625, 0.25])


def test_wsd_exp_is_minicpm_half_life_form():
    # MiniCPM: lr = peak * 0.5^((s - T) / T_half); ours picks T_half = D ln2 / ln(peak / floor), which lands on the
    # floor at the last step.
    peak, floor, total, decay = 5e-5, 1e-5, 1000, 100
    t_half = decay * math.log(2) / math.log(peak / floor)
    for s in (900, 925, 950, 999):
        assert C.wsd_lr(s, total, peak, floor, 10, decay) == pytest.approx(peak * 0.5 ** ((s - 899) / t_half))


def test_cosine_values_by_hand():
    vals = [C.cosine_lr(s, 10, 1.0, 0.0, 2) for s in range(10)]
    assert vals[:2] == pytest.approx([0.5, 1.0])
    assert vals[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))  # 0.96194
    assert vals[5] == pytest.approx(0.5)  # p = 4/8: halfway
    assert vals[9] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(vals[1:], vals[2:]))


def test_stage_defaults_follow_the_report():
    pt = TrainConfig(stage="pt3", steps=100, warmup_frac=0.0)
    assert (pt.schedule, pt.lr, pt.min_lr) == ("wsd", 5e-5, 1e-5)
    assert lr_at(pt, 50) == 5e-5 and lr_at(pt, 99) == pytest.approx(1e-5)
    sft = TrainConfig(stage="sft", steps=100)
    assert lr_at(sft, 99) == pytest.approx(1e-6)
    v3 = TrainConfig(stage="video3d", steps=100, warmup_frac=0.1)
    assert lr_at(v3, 9) == pytest.approx(5e-6) and lr_at(v3, 0) == pytest.approx(5e-7)
    own = TrainConfig(stage="pt1", lr=1e-3)  # a value given wins; the others still come from the stage
    assert (own.schedule, own.lr, own.min_lr) == ("wsd", 1e-3, 1e-5)
    with pytest.raises(ValueError, match="stage='pt4' is not one of"):
        TrainConfig(stage="pt4")
    with pytest.raises(ValueError, match="min_lr=1e-05, lr=1e-06"):
        TrainConfig(stage="pt1", lr=1e-6)


# ---- trainable sets and learning -------------------------------------------------------------------------------
def test_set_trainable_counts():
    m = model()
    n_res = sum(p.numel() for p in m.resampler.parameters())
    n_vpm = sum(p.numel() for p in m.vpm.parameters())
    n_all = sum(p.numel() for p in m.parameters())
    assert C.set_trainable(m, "pt1") == (n_res, n_all - n_res)
    assert C.set_trainable(m, "pt2") == (n_res + n_vpm, n_all - n_res - n_vpm)
    assert C.set_trainable(m, "sft") == (n_all, 0)
    n_llm = sum(p.numel() for p in m.llm.parameters())
    assert C.set_trainable(m, "lm") == (n_llm, n_all - n_llm)


def test_no_weight_decay_on_norms_biases_and_queries():
    m = model()
    C.set_trainable(m, "pt3")
    decay, no_decay = C.param_groups(m, 0.1)
    ids = {id(p): n for n, p in m.named_parameters()}
    names = {ids[id(p)] for p in no_decay["params"]}
    assert "resampler.query" in names and "llm.model.norm.weight" in names and "resampler.kv_proj.weight" not in names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


STAGE_PREFIXES = {"pt1": {"resampler"}, "pt2": {"resampler", "vpm"}, "pt3": {"resampler", "vpm", "llm"},
                  "video3d": {"resampler", "vpm", "llm"}}


@pytest.mark.parametrize("stage", list(STAGE_PREFIXES))
def test_stage_changes_exactly_its_tensors_and_loss_goes_down(stage):
    m = model()
    before = weights(m)
    batch = make_batch(0)
    with torch.no_grad():
        start = m(**batch).loss.item()
    cfg = TrainConfig(stage=stage, steps=4, lr=3e-3, min_lr=3e-3, schedule="constant", log_every=0)
    train(cfg, m, [batch])
    with torch.no_grad():
        end = m(**batch).loss.item()
    assert end < start - 0.05, (start, end)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    expected = {k for k in before if k.split(".")[0] in STAGE_PREFIXES[stage]}
    assert changed == expected, (sorted(expected - changed)[:5], sorted(changed - expected)[:5])


def test_real_processor_batch_trains():
    from PIL import Image
    proc = Processor(Tokenizer.tiny(), CFG)
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    s = [proc([{"role": "user", "content": [img, q]}, {"role": "assistant", "content": a}],
              add_generation_prompt=False) for q, a in (("Color?", "red"), ("What is it?", "a red box"))]
    batch = collate(s, proc.tokenizer.pad_id, padding_side="right")
    hist = train(TrainConfig(stage="sft", steps=5, lr=3e-3, schedule="constant", log_every=0), model(), [batch])
    assert hist[-1] < hist[0]


def test_accumulation_is_token_weighted_like_one_big_batch():
    # Two micro-batches with different numbers of label tokens == one batch holding both (right padding).
    a, b = make_batch(1, B=1, T=24), make_batch(2, B=1, T=24)
    b["labels"][:, :20] = -100  # b has 3 label tokens, a has 11
    big = {k: (torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] + b[k]) for k in a}
    # eps=1: AdamW's first update lr*g/(|g|+eps) is then ~linear in g, so weights compare gradients; with the
    # default eps it is ~lr*sign(g), which float noise on near-zero gradients can flip.
    cfg = TrainConfig(stage="pt3", steps=1, lr=1e-3, schedule="constant", clip=0.0, eps=1.0, log_every=0)
    m1, m2 = model(), model()
    h1 = train(replace(cfg, grad_accum=2), m1, [a, b])
    h2 = train(cfg, m2, [big])
    assert h1[0] == pytest.approx(h2[0], rel=1e-6)
    w1, w2 = weights(m1), weights(m2)
    # < ~1 ulp of O(1) weights; a plain loss / accum (equal micro-batch weights) is off by 1.4e-4.
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-7


def test_gradient_checkpointing_gives_the_same_steps():
    cfg = TrainConfig(stage="pt3", steps=2, lr=1e-3, schedule="constant", log_every=0)
    m1, m2 = model(), model()
    h1 = train(cfg, m1, [make_batch(4, B=1)])
    h2 = train(replace(cfg, grad_checkpointing=True), m2, [make_batch(4, B=1)])
    assert m2.llm.model.gradient_checkpointing and h1 == h2
    w1, w2 = weights(m1), weights(m2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_dummy_visual_keeps_the_loss_and_gives_zero_vision_grads():
    m = model()
    text = make_batch(3, views=False)
    ref = m(**text).loss
    ref.backward()  # without the dummy the vision side is not in the graph: DDP's reducer would wait for it
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith(("vpm.", "resampler.")))
    m.zero_grad(set_to_none=True)
    dummy = C.add_dummy_visual(text, CFG.query_num, CFG.patch_size)
    out = m(**dummy)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-6)
    out.loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if n.startswith(("vpm.", "resampler."))]
    assert all(g is not None for g in grads) and all(float(g.abs().max()) == 0.0 for g in grads)


# ---- checkpoints and resume ------------------------------------------------------------------------------------
def _crash_after(n):
    def on_step(step, metrics):
        if step + 1 == n:
            raise KeyboardInterrupt
    return on_step


@pytest.mark.parametrize("lora", [False, True])
def test_resume_gives_identical_losses_and_weights(tmp_path, lora):
    batches = [make_batch(i, B=1) for i in range(3)] + [make_batch(9, B=1, views=False)]
    cfg = TrainConfig(stage="sft", steps=4, lr=2e-3, min_lr=1e-4, schedule="wsd", warmup_frac=0.25, decay_frac=0.5,
                      grad_accum=2, out_dir=str(tmp_path / "full"), log_every=0, lora=lora, lora_r=4,
                      lora_alpha=8, lora_dropout=0.2)
    full_model = model()
    full = train(cfg, full_model, batches)
    half_cfg = replace(cfg, out_dir=str(tmp_path / "half"), save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(half_cfg, model(), batches, on_step=_crash_after(2))
    resumed_model = model(seed=123)  # a different init: everything must come from the checkpoint
    rest = train(replace(half_cfg, resume=True), resumed_model, batches)
    assert len(rest) == 2 and rest == full[2:]  # bit-identical, not approximately
    wf, wr = weights(full_model), weights(resumed_model)
    assert wf.keys() == wr.keys() and all(torch.equal(wf[k], wr[k]) for k in wf)
    assert (tmp_path / "half" / "latest").read_text() == "step-4"


def test_crash_mid_save_keeps_latest_complete(tmp_path, monkeypatch):
    cfg = TrainConfig(stage="pt1", steps=4, lr=1e-3, schedule="constant", out_dir=str(tmp_path), save_every=2,
                      log_every=0)
    real_save = S.save_file  # writes the trainer state, after the weights, into the step's temporary folder

    def flaky(tensors, path, *a, **k):
        if "step-4" in str(path):
            raise OSError("disk full")
        return real_save(tensors, path, *a, **k)
    monkeypatch.setattr(S, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, model(), [make_batch(0)])
    assert S.latest_checkpoint(tmp_path).name == "step-2"
    assert not (tmp_path / "step-4").exists()
    m = model(seed=5)
    S.load_model_state(tmp_path / "step-2", m)  # the folder `latest` names is complete and loads


def test_resume_mismatch_names_the_field(tmp_path):
    cfg = TrainConfig(stage="pt1", steps=2, lr=1e-3, schedule="constant", out_dir=str(tmp_path), log_every=0)
    train(cfg, model(), [make_batch(0)])
    with pytest.raises(S.ResumeError, match=r"TrainConfig\.lr=0\.001.*0\.002"):
        train(replace(cfg, lr=2e-3, resume=True), model(), [make_batch(0)])
    other = MiniCPMVConfig.from_name("tiny", max_slice_nums=2)
    with pytest.raises(S.ResumeError, match="max_slice_nums=4"):
        train(replace(cfg, resume=True), MiniCPMV(other), [make_batch(0)])


# ---- command line ----------------------------------------------------------------------------------------------
def _cli(argv):
    import argparse

    from vlmcook.train.cli import add_parser
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["train", *argv])
    return args.fn(args)


def test_cli_trains_resumes_and_parses_data_specs(tmp_path, capsys):
    import json

    from vlmcook.train.cli import parse_data
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{i} plus one?"}, {"role": "assistant", "content": f"{i + 1}"}]}
            for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    assert parse_data([f"{data}:0.5", str(data)]) == [(data, 0.5), (data, 1.0)]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        parse_data([str(tmp_path / "nope.jsonl:2")])
    out = tmp_path / "run"
    common = ["--stage", "sft", "--preset", "tiny", "--data", f"{data}:2", "--out", str(out), "--batch-size", "2",
              "--lr", "1e-3", "--log-every", "0"]
    assert _cli([*common, "--steps", "2"]) == 0
    assert S.latest_checkpoint(out).name == "step-2"
    assert _cli([*common, "--steps", "2", "--resume"]) == 0  # nothing left to do, but it must load cleanly
    assert "resuming from" in capsys.readouterr().out
    with pytest.raises(S.ResumeError, match="TrainConfig.steps=2"):
        _cli([*common, "--steps", "3", "--resume"])
