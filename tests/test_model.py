"""The composed model: released names and shapes, the visual scatter, per-sample package split, loss, cache."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from vlmcook.config import PRESETS
from vlmcook.model.minicpmv import MiniCPMV

# Shapes from the checkpoint table of docs/reference.md 3, written out independently of our config code.
SPEC_SHAPES = [
    (r"llm\.model\.embed_tokens\.weight", [151748, 4096]),
    (r"llm\.model\.layers\.\d+\.self_attn\.[qo]_proj\.weight", [4096, 4096]),
    (r"llm\.model\.layers\.\d+\.self_attn\.[kv]_proj\.weight", [1024, 4096]),
    (r"llm\.model\.layers\.\d+\.self_attn\.[qk]_norm\.weight", [128]),
    (r"llm\.model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight", [12288, 4096]),
    (r"llm\.model\.layers\.\d+\.mlp\.down_proj\.weight", [4096, 12288]),
    (r"llm\.model\.layers\.\d+\.(input|post_attention)_layernorm\.weight", [4096]),
    (r"llm\.model\.norm\.weight", [4096]),
    (r"llm\.lm_head\.weight", [151748, 4096]),
    (r"vpm\.embeddings\.patch_embedding\.weight", [1152, 3, 14, 14]),
    (r"vpm\.embeddings\.patch_embedding\.bias", [1152]),
    (r"vpm\.embeddings\.position_embedding\.weight", [4900, 1152]),
    (r"vpm\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.weight", [1152, 1152]),
    (r"vpm\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.bias", [1152]),
    (r"vpm\.encoder\.layers\.\d+\.layer_norm[12]\.(weight|bias)", [1152]),
    (r"vpm\.encoder\.layers\.\d+\.mlp\.fc1\.weight", [4304, 1152]),
    (r"vpm\.encoder\.layers\.\d+\.mlp\.fc1\.bias", [4304]),
    (r"vpm\.encoder\.layers\.\d+\.mlp\.fc2\.weight", [1152, 4304]),
    (r"vpm\.encoder\.layers\.\d+\.mlp\.fc2\.bias", [1152]),
    (r"vpm\.post_layernorm\.(weight|bias)", [1152]),
    (r"resampler\.query", [64, 4096]),
    (r"resampler\.kv_proj\.weight", [4096, 1152]),
    (r"resampler\.attn\.in_proj_weight", [12288, 4096]),
    (r"resampler\.attn\.in_proj_bias", [12288]),
    (r"resampler\.attn\.out_proj\.weight", [4096, 4096]),
    (r"resampler\.attn\.out_proj\.bias", [4096]),
    (r"resampler\.ln_(q|kv|post)\.(weight|bias)", [4096]),
    (r"resampler\.proj", [4096, 4096]),
]


def test_v4_5_on_meta_matches_the_released_index(reference_dir):
    with torch.device("meta"):
        model = MiniCPMV(PRESETS["v4_5"])
    state = model.state_dict()
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())
    assert sorted(state) == sorted(index["weight_map"])  # all 849 names, nothing more (no persistent buffers)
    assert len(state) == 849
    n_params = sum(t.numel() for t in state.values())
    assert n_params == 8_695_895_280
    assert n_params * 2 == index["metadata"]["total_size"]  # every released tensor is bf16
    for name, t in state.items():
        shapes = [s for pat, s in SPEC_SHAPES if re.fullmatch(pat, name)]
        assert len(shapes) == 1, name
        assert list(t.shape) == shapes[0], name


def _tiny():
    torch.manual_seed(0)
    return MiniCPMV(PRESETS["tiny"]).eval()


def _views(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 14 * h, 14 * w, generator=g) * 2 - 1 for h, w in sizes]


def _sample(n_text_before, packages, Q, vocab, seed):
    """ids with one run of Q placeholder ids per package, separated by text; returns ids and bounds."""
    g = torch.Generator().manual_seed(seed)
    ids, bounds = list(torch.randint(10, vocab, (n_text_before,), generator=g).tolist()), []
    for _ in packages:
        bounds.append([len(ids), len(ids) + Q])
        ids += [3] * Q + torch.randint(10, vocab, (2,), generator=g).tolist()
    return ids, bounds


def test_embed_scatters_packages_in_order_and_batch_split_is_per_package():
    model = _tiny()
    Q, vocab = model.config.query_num, model.config.llm.vocab_size
    # sample 0: an image (2 views: overview + 1 slice) ; sample 1: a video package of 3 frames + one of 1 frame
    views0, packs0 = _views([(4, 6), (5, 3)], 1), [[-1], [-1]]
    views1, packs1 = _views([(4, 4)] * 4, 2), [[10, 15, 20], [25]]
    ids0, b0 = _sample(3, packs0, Q, vocab, 3)
    ids1, b1 = _sample(5, packs1, Q, vocab, 4)
    T = max(len(ids0), len(ids1))
    ids = torch.zeros(2, T, dtype=torch.long)
    ids[0, :len(ids0)] = torch.tensor(ids0)
    ids[1, :len(ids1)] = torch.tensor(ids1)
    with torch.no_grad():
        emb = model.embed(ids, [views0, views1], [packs0, packs1], [torch.tensor(b0), torch.tensor(b1)])
        vis0 = model.encode_views(views0, packs0)  # [2, Q, D]
        vis1 = model.encode_views(views1, packs1)
        text = model.llm.model.embed_tokens(ids)
    assert vis1.shape[0] == 2  # a 3-frame package is one output
    for b, (bounds, vis) in enumerate([(b0, vis0), (b1, vis1)]):
        mask = torch.zeros(T, dtype=torch.bool)
        for k, (s, e) in enumerate(bounds):
            torch.testing.assert_close(emb[b, s:e], vis[k], rtol=1e-5, atol=1e-6)
            mask[s:e] = True
        torch.testing.assert_close(emb[b, ~mask], text[b, ~mask])  # text untouched


def test_bound_mismatch_is_asserted_never_a_partial_scatter():
    model = _tiny()
    Q = model.config.query_num
    ids, bounds = _sample(2, [[-1]], Q, 100, 0)
    views, T = [_views([(2, 2)])], len(ids)
    ids = torch.tensor([ids])
    s, e = bounds[0]
    with pytest.raises(AssertionError, match=rf"sample 0: image_bound covers {Q - 1} slots, 1 packages x {Q}"):
        model.embed(ids, views, [[[-1]]], [torch.tensor([[s, e - 1]])])
    # right count, wrong places: negative positions would index from the end, overlapping spans write twice
    for bad in ([[-Q, 0]], [[s, s + 2], [s + 1, s + Q - 1]], [[T - Q + 1, T + 1]]):
        with pytest.raises(AssertionError, match=rf"image_bound {re.escape(str(bad))}, T={T}"):
            model.embed(ids, views, [[[-1]]], [torch.tensor(bad)])
    with pytest.raises(AssertionError, match="image_bound without pixel_values"):
        model.embed(ids, None, None, [torch.tensor([bounds[0]])])
    with pytest.raises(AssertionError, match="packages cover 2 views, tgt_sizes 1"):
        model.encode_views(_views([(2, 2)]), [[-1], [-1]])


def test_loss_is_cross_entropy_on_labelled_next_tokens():
    model = _tiny()
    Q, vocab = model.config.query_num, model.config.llm.vocab_size
    views, packs = _views([(3, 5)]), [[-1]]
    ids, bounds = _sample(4, packs, Q, vocab, 5)
    ids = torch.tensor([ids + [20, 21, 22, 23]])
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    batch = dict(pixel_values=[views], temporal_ids=[packs], image_bound=[torch.tensor(bounds)])
    out = model(ids, labels=labels, **batch)
    logits = model(ids, **batch).logits  # [1, T, V]
    want = F.cross_entropy(logits[0, -5:-1], ids[0, -4:])
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert out.num_label_tokens == 4
    out.loss.backward()
    assert model.resampler.query.grad is not None and model.vpm.embeddings.patch_embedding.weight.grad is not None


def test_prefill_then_decode_with_cache_matches_full_forward():
    model = _tiny()
    Q, vocab = model.config.query_num, model.config.llm.vocab_size
    views, packs = _views([(4, 4), (4, 4)]), [[3, 8]]
    ids, bounds = _sample(3, packs, Q, vocab, 6)
    ids = torch.tensor([ids + [30, 31, 32]])
    batch = dict(pixel_values=[views], temporal_ids=[packs], image_bound=[torch.tensor(bounds)])
    with torch.no_grad():
        full = model(ids, **batch).logits
        n = ids.shape[1] - 3
        cache = model.llm.new_cache(batch_size=1, max_len=ids.shape[1])
        steps = [model(ids[:, :n], cache=cache, **batch).logits]
        for t in range(n, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
