"""Checkpoints in the released layout: round trip, other readers, and every kind of bad checkpoint."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from vlmcook.checkpoint import CheckpointError, load_model, save_model
from vlmcook.config import PRESETS
from vlmcook.model.minicpmv import MiniCPMV


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = MiniCPMV(PRESETS["tiny"]).eval()
    folder = save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", max_shard_bytes=200_000)
    return model, folder


def _inputs(model):
    Q = model.config.query_num
    ids = torch.tensor([[5, 6] + [3] * Q + [7, 8, 9]])
    return dict(input_ids=ids, pixel_values=[[torch.rand(3, 56, 42) * 2 - 1]], temporal_ids=[[[-1]]],
                image_bound=[torch.tensor([[2, 2 + Q]])])


def test_round_trip_is_exact_and_sharded(saved):
    model, folder = saved
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    again = load_model(folder)
    assert again.llm.lm_head.weight.dtype == torch.float32  # tiny stores float32
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with torch.no_grad():
        inputs = _inputs(model)
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_what_we_write_other_tools_read(saved):
    model, folder = saved
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(folder / shard))  # the safetensors library itself
    assert set(loaded) == set(model.state_dict()) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "minicpmv" and cfg["hidden_size"] == PRESETS["tiny"].llm.hidden_size


def test_load_in_other_dtypes(saved):
    model, folder = saved
    m16 = load_model(folder, dtype="bfloat16")
    assert m16.resampler.proj.dtype == torch.bfloat16
    torch.testing.assert_close(m16.resampler.proj.float(), model.resampler.proj.to(torch.bfloat16).float())


def _copy(folder, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_missing_tensor_is_named(saved, tmp_path):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["resampler.query"]
    tensors = load_file(dst / shard)
    del tensors["resampler.query"]
    from safetensors.torch import save_file
    save_file(tensors, str(dst / shard))
    with pytest.raises(CheckpointError, match=r"resampler\.query"):
        load_model(dst)
    del index["weight_map"]["resampler.query"]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing tensor 'resampler\.query'"):
        load_model(dst)


def test_truncated_and_missing_shards_are_named(saved, tmp_path):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    last = sorted(dst.glob("model-*.safetensors"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{last.name}: truncated"):
        load_model(dst)
    last.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=f"{last.name}: truncated"):
        load_model(dst)
    last.unlink()
    with pytest.raises(CheckpointError, match=f"{last.name}: shard missing"):
        load_model(dst)


def test_config_that_disagrees_with_weights(saved, tmp_path):
    model, folder = saved
    dst = _copy(folder, tmp_path)
    tiny = PRESETS["tiny"]
    bigger = replace(tiny, llm=replace(tiny.llm, intermediate_size=96))
    (dst / "config.json").write_text(json.dumps(bigger.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight' has shape \[128, 64\] but the config implies"):
        load_model(dst)
    deeper = replace(tiny, llm=replace(tiny.llm, num_hidden_layers=3))
    (dst / "config.json").write_text(json.dumps(deeper.to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"missing tensor 'llm\.model\.layers\.2\."):
        load_model(dst)


def test_save_replaces_atomically(saved, tmp_path):
    model, _ = saved
    folder = save_model(model, tmp_path / "m")
    (folder / "stale.txt").write_text("old")
    save_model(model, folder)
    assert not (folder / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left behind
