import json

import pytest
from PIL import Image

from vlmcook.config import PRESETS, ConfigError, MiniCPMVConfig
from vlmcook.data.image import preprocess_image
from vlmcook.data.tokenizer import Tokenizer


def test_released_config_reads_as_the_v4_5_preset(reference_dir):
    cfg = MiniCPMVConfig.from_file(reference_dir)
    assert cfg == PRESETS["v4_5"]
    # Spot facts from docs/reference.md section 2, independent of our preset's defaults.
    assert (cfg.llm.hidden_size, cfg.llm.num_hidden_layers, cfg.llm.num_key_value_heads) == (4096, 36, 8)
    assert (cfg.vision.num_hidden_layers, cfg.vision.head_dim, cfg.vision.num_patches_per_side) == (27, 72, 70)
    assert (cfg.resampler.num_heads, cfg.resampler.head_dim, cfg.query_num) == (32, 128, 64)


def test_released_preprocessor_and_generation_files_agree_with_our_code(reference_dir):
    pre = json.loads((reference_dir / "preprocessor_config.json").read_text())
    cfg = PRESETS["v4_5"]
    assert (pre["max_slice_nums"], pre["scale_resolution"], pre["patch_size"], pre["image_feature_size"],
            pre["use_image_id"]) == (cfg.max_slice_nums, cfg.scale_resolution, cfg.patch_size, cfg.query_num,
                                     cfg.use_image_id)
    # pixels are normalised with the released mean / std: one 448x448 view (no slicing) of a 3-colour image
    rgb = (0, 128, 255)
    view = preprocess_image(Image.new("RGB", (448, 448), rgb), cfg.scale_resolution, cfg.max_slice_nums).views[0]
    want = [(v / 255 - m) / s for v, m, s in zip(rgb, pre["norm_mean"], pre["norm_std"])]
    assert view.shape == (3, 448, 448) and view.amax(dim=(1, 2)).tolist() == pytest.approx(want, abs=1e-6)
    gen = json.loads((reference_dir / "generation_config.json").read_text())
    tok = Tokenizer.from_dir(reference_dir)
    assert tuple(gen["eos_token_id"]) == tok.stop_ids and gen["pad_token_id"] == tok.pad_id


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_dict_round_trip(name):
    cfg = PRESETS[name]
    again = MiniCPMVConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert again == cfg


def test_unknown_field_is_named():
    d = PRESETS["tiny"].to_hf_dict()
    d["num_expertz"] = 4
    with pytest.raises(ConfigError, match="num_expertz"):
        MiniCPMVConfig.from_hf_dict(d)
    d = PRESETS["tiny"].to_hf_dict()
    d["vision_config"]["projection_dim"] = 4
    with pytest.raises(ConfigError, match="projection_dim"):
        MiniCPMVConfig.from_hf_dict(d)


@pytest.mark.parametrize("key,value,match", [
    ("drop_vision_last_layer", True, "drop_vision_last_layer"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("patch_size", 16, "patch_size 16 contradicts"),
    ("model_type", "llava", "model_type"),
])
def test_contradictory_fields_are_named(key, value, match):
    d = PRESETS["v4_5"].to_hf_dict()
    d[key] = value
    with pytest.raises(ConfigError, match=match):
        MiniCPMVConfig.from_hf_dict(d)


def test_bad_files_fail_with_path(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        MiniCPMVConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MiniCPMVConfig.from_file(tmp_path)


def test_component_sizes_must_agree():
    from dataclasses import replace
    tiny = PRESETS["tiny"]
    with pytest.raises(ConfigError, match="embed_dim"):
        replace(tiny, llm=replace(tiny.llm, hidden_size=128))
    with pytest.raises(ConfigError, match="unknown preset"):
        MiniCPMVConfig.from_name("huge")
