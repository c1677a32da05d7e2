"""Sizes from a checkpoint's config.json are checked before anything is allocated: typed and positive fields, a
parameter bound, and the stored shapes before `to_empty`. The parameter count is checked against built models."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmcook.checkpoint import CheckpointError, load_model, save_model
from vlmcook.config import MAX_PARAMETERS, PRESETS, ConfigError, MiniCPMVConfig, parameter_parts
from vlmcook.model.minicpmv import MiniCPMV


def _built_counts(cfg) -> dict[str, int]:
    with torch.device("meta"):
        model = MiniCPMV(cfg)
    return {k: sum(p.numel() for n, p in model.state_dict().items() if n.startswith(k))
            for k in ("llm.", "vpm.", "resampler.")}


def _split(parts) -> dict[str, int]:
    (emb, _), (layers, _), (vision, _), (resampler, _) = parts
    return {"llm.": emb + layers, "vpm.": vision, "resampler.": resampler}


def test_parameter_count_of_the_presets():
    assert _split(parameter_parts(PRESETS["tiny"])) == _built_counts(PRESETS["tiny"])
    released = parameter_parts(PRESETS["v4_5"])
    assert _split(released) == _built_counts(PRESETS["v4_5"])
    # The released index's total_size (bf16 bytes), /work/shared/reference/minicpm-v-4_5/model.safetensors.index.json.
    assert 2 * sum(n for n, _ in released) == 17_391_790_560


@settings(database=None, deadline=None, max_examples=25)
@given(heads=st.integers(1, 4), kv=st.sampled_from([1, 2]), hd=st.sampled_from([2, 8]), layers=st.integers(1, 3),
       vocab=st.integers(1, 300), inter=st.integers(1, 40), vh=st.sampled_from([4, 8]), vl=st.integers(1, 2),
       img=st.sampled_from([14, 28, 70]), queries=st.integers(1, 9))
def test_parameter_count_matches_the_built_model(heads, kv, hd, layers, vocab, inter, vh, vl, img, queries):
    tiny = PRESETS["tiny"]
    hidden = 4 * heads
    cfg = replace(tiny, llm=replace(tiny.llm, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers, num_attention_heads=heads * kv, num_key_value_heads=kv,
                                    head_dim=hd),
                  vision=replace(tiny.vision, hidden_size=vh, intermediate_size=inter, num_hidden_layers=vl,
                                 num_attention_heads=2, image_size=img),
                  resampler=replace(tiny.resampler, num_queries=queries, embed_dim=hidden, num_heads=1, kv_dim=vh))
    assert _split(parameter_parts(cfg)) == _built_counts(cfg)


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", 10**12, "largest part is the LLM embeddings and head: 2 x vocab_size 1000000000000"),
    ("hidden_size", 10**9, "hidden_size 1000000000"),
    ("intermediate_size", 10**10, "intermediate_size 10000000000"),
    ("num_hidden_layers", 10**6, "num_hidden_layers 1000000"),
    ("hidden_size", "4096", "hidden_size must be an integer >= 1, got '4096'"),
    ("hidden_size", 4096.0, "hidden_size must be an integer >= 1, got 4096.0"),
    ("num_key_value_heads", 0, "num_key_value_heads must be an integer >= 1, got 0"),
    ("vocab_size", -5, "vocab_size must be an integer >= 1"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps must be a positive finite number"),
    ("vision_config", {"hidden_size": 10**7}, "vision_config.num_hidden_layers 27 x \\(hidden_size 10000000"),
    ("vision_config", {"num_hidden_layers": True}, "vision_config.num_hidden_layers must be an integer"),
    ("vision_config", [], "vision_config must be a JSON object"),
    ("use_image_id", "yes", "use_image_id must be a bool"),
])
def test_absurd_or_mistyped_config_is_named(field, value, message):
    d = PRESETS["v4_5"].to_hf_dict()
    if field == "vision_config" and isinstance(value, dict):
        d["vision_config"].update(value)
    else:
        d[field] = value
    if field == "hidden_size" and isinstance(value, int):
        d["resampler_num_heads"] = 8
    with pytest.raises(ConfigError, match=message):
        MiniCPMVConfig.from_hf_dict(d)


def test_the_bound_is_about_one_thousand_billion_parameters():
    d = PRESETS["v4_5"].to_hf_dict()
    # vocab x hidden x 2 dominates: just under and just over MAX_PARAMETERS.
    rest = sum(n for n, _ in parameter_parts(PRESETS["v4_5"])[1:])
    fits = (MAX_PARAMETERS - rest) // (2 * 4096)
    MiniCPMVConfig.from_hf_dict(dict(d, vocab_size=fits))
    with pytest.raises(ConfigError, match="over the limit of 1e\\+12"):
        MiniCPMVConfig.from_hf_dict(dict(d, vocab_size=fits + 1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(MiniCPMV(PRESETS["tiny"]), tmp_path_factory.mktemp("ckpt") / "tiny")


def test_checkpoint_with_absurd_config_fails_before_allocating(saved, tmp_path, monkeypatch):
    dst = tmp_path / "m"
    shutil.copytree(saved, dst)
    cfg = json.loads((dst / "config.json").read_text())

    def no_allocation(self, *a, **k):
        raise AssertionError("allocated before the checks")
    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    (dst / "config.json").write_text(json.dumps(dict(cfg, vocab_size=10**12)))
    with pytest.raises(ConfigError, match="config.json: .*vocab_size 1000000000000"):
        load_model(dst)
    # Inside the bound (2.6 GB of float32) but not what the shards hold: refused from the headers alone.
    (dst / "config.json").write_text(json.dumps(dict(cfg, vocab_size=10**7)))
    with pytest.raises(CheckpointError, match="embed_tokens.weight' has shape \\[512, 64\\] but the config implies "
                                              "\\[10000000, 64\\]"):
        load_model(dst)
