"""LoRA: the adapter math against a hand formula and against peft, targets, only adapters (and the stage's vision side)
train, merged == adapter outputs, keys after merge == released keys, saved adapters / merged checkpoints."""

import json

import pytest
import torch
import torch.nn as nn

from vlmcook.checkpoint import load_model
from vlmcook.config import MiniCPMVConfig
from vlmcook.model.lora import (DEFAULT_TARGETS, LoRALinear, add_lora, base_state_dict, lora_state_dict,
                                merge_lora)
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.train import common as C
from vlmcook.train.loop import TrainConfig, train
from test_train_loop import make_batch

CFG = MiniCPMVConfig.from_name("tiny")


def _lora_linear(bias=True) -> tuple[nn.Linear, LoRALinear]:
    base = nn.Linear(12, 10, bias=bias)
    lora = LoRALinear.from_linear(base, r=3, alpha=6.0)
    nn.init.normal_(lora.lora_B)  # B starts at 0; make the update visible
    return base, lora


def test_lora_linear_matches_the_formula_and_starts_as_identity():
    base, lora = _lora_linear()
    x = torch.randn(4, 5, 12)
    want = x @ (base.weight + 2.0 * lora.lora_B @ lora.lora_A).T + base.bias  # alpha / r = 2
    torch.testing.assert_close(lora(x), want, rtol=1e-5, atol=1e-5)
    fresh = LoRALinear.from_linear(base, r=3, alpha=6.0)
    torch.testing.assert_close(fresh(x), base(x))  # B = 0
    assert not fresh.weight.requires_grad and not fresh.bias.requires_grad and fresh.lora_A.requires_grad


def test_matches_peft():
    peft = pytest.importorskip("peft")
    base, lora = _lora_linear()
    host = nn.Sequential(nn.Linear(12, 10))
    host[0].load_state_dict(base.state_dict())
    pm = peft.get_peft_model(host, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.0))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora.lora_A)
        layer.lora_B["default"].weight.copy_(lora.lora_B)
    x = torch.randn(7, 12)
    torch.testing.assert_close(lora(x), pm(x), rtol=1e-5, atol=1e-5)


def test_add_lora_targets_llm_attention_only_by_default():
    m = MiniCPMV(CFG)
    names = add_lora(m, r=2, alpha=4)
    L = CFG.llm.num_hidden_layers
    assert sorted(names) == sorted(f"llm.model.layers.{i}.self_attn.{p}_proj" for i in range(L) for p in "qkvo")
    with pytest.raises(ValueError, match="match no nn.Linear"):
        add_lora(MiniCPMV(CFG), targets=r"^llm\.nonexistent$")
    vis = add_lora(MiniCPMV(CFG), targets=r"^vpm\..*self_attn\.q_proj$|^resampler\.kv_proj$", r=2, alpha=4)
    assert "resampler.kv_proj" in vis and len(vis) == CFG.vision.num_hidden_layers + 1


def test_only_adapters_and_the_stage_vision_side_train_then_merge_equals_adapters(tmp_path):
    torch.manual_seed(0)
    m = MiniCPMV(CFG)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batch = make_batch(0)
    cfg = TrainConfig(stage="sft", steps=3, lr=5e-3, schedule="constant", lora=True, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, out_dir=str(tmp_path), log_every=0)
    train(cfg, m, [batch])
    after = m.state_dict()
    for k, v in after.items():
        changed = k not in before or not torch.equal(v, before[k])
        is_adapter = k.endswith((".lora_A", ".lora_B"))
        # LLM: only adapters (lora_A may stay put only if B's gradient was all there was; B must move).
        if k.startswith("llm.") and not is_adapter:
            assert not changed, k
        if k.endswith(".lora_B") or k.startswith(("vpm.", "resampler.")):
            assert changed, k
    m.eval()
    with torch.no_grad():
        adapter_logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
        merge_lora(m)
        merged_logits = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)
    assert set(m.state_dict()) == set(MiniCPMV(CFG).state_dict())

    # The step folder: unmerged base in the released layout + adapters + a merged/ model that loads as released.
    step = tmp_path / "step-3"
    assert json.loads((step / "adapter_config.json").read_text())["r"] == 4
    reloaded = load_model(step / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                   adapter_logits, rtol=1e-5, atol=1e-5)


def test_set_trainable_with_lora_freezes_llm_base():
    m = MiniCPMV(CFG)
    add_lora(m, r=2, alpha=2)
    n_train, _ = C.set_trainable(m, "pt3")
    adapters = sum(v.numel() for v in lora_state_dict(m).values())
    vision = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("vpm.", "resampler.")))
    assert n_train == adapters + vision
    C.set_trainable(m, "pt1")
    assert {n for n, p in m.named_parameters() if p.requires_grad and not n.startswith("resampler.")} == \
        {n for n in lora_state_dict(m)}


def test_merge_restores_released_keys_on_the_v4_5_layout(reference_dir):
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with torch.device("meta"):
        m = MiniCPMV(MiniCPMVConfig.from_name("v4_5"))
        add_lora(m, DEFAULT_TARGETS, r=64, alpha=64)
        assert set(base_state_dict(m)) == set(index)
        assert len(lora_state_dict(m)) == 2 * 4 * 36
        merge_lora(m)
    assert set(m.state_dict()) == set(index)
