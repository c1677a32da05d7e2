"""Vision tower: parity with transformers' Idefics2 NaViT SigLIP, the released position-id rule, packing."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from vlmcook.config import VisionConfig
from vlmcook.model.vision import VisionTransformer, navit_position_ids, patchify

CFG = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)  # side 70
P = CFG.patch_size


def _views(sizes):
    return [torch.randn(3, h * P, w * P) for h, w in sizes]


def _run_ours(model, views):
    patches = torch.cat([patchify(v, P) for v in views])
    tgt = torch.tensor([[v.shape[1] // P, v.shape[2] // P] for v in views])
    return model(patches, tgt)


def _hf_tower(cfg=CFG):
    idefics2 = pytest.importorskip("transformers.models.idefics2.modeling_idefics2")
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

    hcfg = Idefics2VisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                                patch_size=cfg.patch_size, image_size=cfg.image_size, layer_norm_eps=cfg.layer_norm_eps,
                                hidden_act="gelu_pytorch_tanh")
    hcfg._attn_implementation = "eager"  # the release's vision path (fp32 softmax, additive padding mask)
    hf = idefics2.Idefics2VisionTransformer(hcfg).eval()
    with torch.no_grad():  # HF's init leaves biases at 0 and LN at 1; randomise all so every weight matters
        for name, p in hf.named_parameters():
            p.normal_(0, 0.2)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)  # LayerNorm gains near 1 keep the output at unit scale, so atol 1e-5 is tight
    return hf


def _run_hf(hf, views, position_ids=None):
    """Pad the views top-left into one [B, 3, H, W] batch with a [B, h, w] patch mask, as Idefics2 expects.

    position_ids: optional per-view released ids that replace Idefics2's own (its coordinate rule differs for some
    sizes). Returns (per-view outputs [h*w, D], the position ids Idefics2 used per view)."""
    hmax = max(v.shape[1] for v in views) // P
    wmax = max(v.shape[2] for v in views) // P
    pixels = torch.zeros(len(views), 3, hmax * P, wmax * P)
    mask = torch.zeros(len(views), hmax, wmax, dtype=torch.bool)
    for b, v in enumerate(views):
        pixels[b, :, :v.shape[1], :v.shape[2]] = v
        mask[b, :v.shape[1] // P, :v.shape[2] // P] = True
    flat = mask.view(len(views), -1)
    seen = {}

    def pre_hook(module, args):
        ids = args[0].clone()
        seen["ids"] = args[0].clone()
        if position_ids is not None:
            for b, pid in enumerate(position_ids):
                ids[b, flat[b]] = pid
        return (ids,)

    handle = hf.embeddings.position_embedding.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            out = hf(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
    finally:
        handle.remove()
    return [out[b, flat[b]] for b in range(len(views))], [seen["ids"][b, flat[b]] for b in range(len(views))]


# ---- checkpoint layout ----------------------------------------------------------------------------------------------
def test_names_and_shapes_match_the_release(reference_dir):
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"]
    released = {k[len("vpm."):] for k in index if k.startswith("vpm.")}
    with torch.device("meta"):
        model = VisionTransformer(VisionConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == released
    # shapes and parameter count from docs/reference.md 2.5 and 3
    assert shapes["embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes["embeddings.position_embedding.weight"] == (4900, 1152)
    assert shapes["encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["encoder.layers.26.self_attn.out_proj.bias"] == (1152,)
    assert sum(p.numel() for p in model.parameters()) == 417_792_240


# ---- parity with transformers' Idefics2VisionTransformer -------------------------------------------------------------
def test_matches_idefics2_on_padded_batch():
    hf = _hf_tower()
    model = VisionTransformer(CFG).eval()
    model.load_state_dict(hf.state_dict(), strict=True)  # identical names: no key mapping
    # repeated, non-adjacent equal lengths (15, 36) exercise the reordering; sizes avoid the rounding trap
    sizes = [(3, 5), (6, 6), (5, 3), (2, 9), (1, 1), (6, 6), (4, 7)]
    views = _views(sizes)
    ref, hf_ids = _run_hf(hf, views)
    for (h, w), ids in zip(sizes, hf_ids):  # precondition: Idefics2 and the release agree on these sizes
        assert torch.equal(ids, navit_position_ids(h, w, CFG.num_patches_per_side)), (h, w)
    with torch.no_grad():
        out = _run_ours(model, views)
    assert out.shape == (sum(h * w for h, w in sizes), CFG.hidden_size)
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-5, rtol=1e-5)


def test_matches_idefics2_given_released_position_ids_on_trap_and_oversize_views():
    hf = _hf_tower()
    model = VisionTransformer(CFG).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    # 25 and 49 are rounding-trap sizes of the released rule (docs/reference.md 4.3); 101 rows > the 70-row table
    sizes = [(25, 7), (101, 3), (49, 2)]
    side = CFG.num_patches_per_side
    released = [navit_position_ids(h, w, side) for h, w in sizes]
    views = _views(sizes)
    ref, hf_ids = _run_hf(hf, views, position_ids=released)
    # the override matters: Idefics2's own `k * (1/n)` rule gives other ids for n=49 (torch 2.13, this CPU)
    assert any(not torch.equal(a, b) for a, b in zip(hf_ids, released))
    with torch.no_grad():
        out = _run_ours(model, views)
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-5, rtol=1e-5)


# ---- the released position-id rule (docs/reference.md 4.3 and 11) ---------------------------------------------
def test_position_ids_vector_1_rows_of_25():
    rows = navit_position_ids(25, 1, 70) // 70
    assert rows.tolist() == [0, 2, 5, 8, 11, 13, 16, 19, 22, 25, 27, 30, 33, 36, 39, 41, 44, 47, 50, 53, 55, 58, 61,
                             64, 67]


def test_position_ids_vector_2_buckets_of_32():
    want = [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 24, 26, 28, 30, 32, 35, 37, 39, 41, 43, 45, 48, 50, 52, 54, 56, 59,
            61, 63, 65, 67]
    ids = navit_position_ids(32, 32, 70)
    assert ids.dtype == torch.long and ids.shape == (1024,)
    assert (ids // 70).unique().tolist() == want  # rows
    assert ids[:32].tolist() == want  # first row: bucket_row 0, so ids are the column buckets
    # row-major: id = bucket_row * 70 + bucket_col
    assert torch.equal(ids, (torch.tensor(want)[:, None] * 70 + torch.tensor(want)[None, :]).flatten())


@pytest.mark.parametrize("n, special", [
    (25, {5: 13, 10: 27, 15: 41, 20: 55}),
    (49, {7: 9, 14: 19, 35: 49, 42: 59}),
    (50, {5: 6, 10: 13, 15: 20, 20: 27, 30: 41, 40: 55}),
    (55, {11: 13, 22: 27, 33: 41, 44: 55}),
    (58, {29: 34}),
])
def test_position_ids_released_rounding_differs_from_floor_exactly_where_the_reference_says(n, special):
    cols = navit_position_ids(1, n, 70)
    floor = [70 * k // n for k in range(n)]
    got = {k: int(c) for k, c in enumerate(cols) if int(c) != floor[k]}
    assert got == special


def test_position_ids_for_views_larger_than_the_table():
    ids = navit_position_ids(101, 10, 70)  # docs/reference.md 11.8: a 100x1000 image becomes one 101x10 view
    assert ids.shape == (1010,)
    rows = ids.view(101, 10)[:, 0] // 70
    assert rows.min() == 0 and rows.max() == 69 and bool((rows.diff() >= 0).all())
    assert len(rows.unique()) == 70  # 101 rows share the 70 buckets: every bucket used, none skipped
    assert (ids.view(101, 10) % 70)[0].tolist() == [70 * k // 10 for k in range(10)]


def test_position_ids_ignore_the_default_dtype():
    want = navit_position_ids(49, 25, 70)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        from vlmcook.model import vision
        vision._buckets.cache_clear()
        vision._position_ids.cache_clear()
        assert torch.equal(navit_position_ids(49, 25, 70), want)
    finally:
        torch.set_default_dtype(old)


# ---- packing, patchify, errors -------------------------------------------------------------------------------------
def test_a_views_output_does_not_depend_on_its_batch():
    model = VisionTransformer(CFG).eval()
    views = _views([(4, 6), (3, 8), (5, 5), (4, 6), (2, 2)])
    with torch.no_grad():
        alone = [_run_ours(model, [v]) for v in views]
        together = _run_ours(model, views).split([v.shape[1] * v.shape[2] // P // P for v in views])
        reversed_ = _run_ours(model, views[::-1]).split([v.shape[1] * v.shape[2] // P // P for v in views[::-1]])
    for a, t, r in zip(alone, together, reversed_[::-1]):
        torch.testing.assert_close(t, a, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r, a, atol=1e-6, rtol=1e-6)


def test_patchify_order_matches_the_conv():
    view = torch.randn(3, 3 * P, 5 * P)
    patches = patchify(view, P)
    assert patches.shape == (15, 3 * P * P)
    r, c = 2, 3  # patch number r*w + c is the image block at row r, column c
    assert torch.equal(patches[r * 5 + c], view[:, r * P:(r + 1) * P, c * P:(c + 1) * P].flatten())
    conv = torch.nn.Conv2d(3, 8, P, P)
    want = conv(view[None]).flatten(2)[0].T  # [15, 8]
    got = F.linear(patches, conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_patchify_rejects_sizes_that_are_not_multiples():
    for shape in [(3, 28, 30), (3, 0, 28), (1, 3, 28, 28)]:  # a public helper: ValueError naming the shape
        with pytest.raises(ValueError, match=re.escape(f"multiples of the patch size 14, got shape {shape}")):
            patchify(torch.zeros(shape), 14)


def test_internal_invariants_are_asserted():
    model = VisionTransformer(CFG)
    good = torch.zeros(6, 3 * P * P)
    # tgt_sizes describing more patches than rows: a view would read its neighbour's rows
    with pytest.raises(AssertionError, match="tgt_sizes: 2 views of 8 patches, x has 6 rows"):
        model(good, torch.tensor([[2, 3], [1, 2]]))
    with pytest.raises(AssertionError, match="a view of 0 patches"):
        model(good, torch.tensor([[2, 3], [0, 3]]))
    with pytest.raises(AssertionError, match="h=0 w=3 side=70"):
        navit_position_ids(0, 3, 70)


def test_no_views_gives_an_empty_output():
    out = VisionTransformer(CFG)(torch.zeros(0, 3 * P * P), torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0, CFG.hidden_size)


def test_backward_reaches_every_weight_through_the_reordering():
    model = VisionTransformer(CFG)
    out = _run_ours(model, _views([(2, 3), (4, 4), (3, 2)]))  # lengths 6, 16, 6: reordered internally
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bf16_weights_accept_fp32_patches():
    model = VisionTransformer(CFG).eval()
    views = _views([(3, 4), (2, 2)])
    with torch.no_grad():
        want = _run_ours(model, views)
        got = _run_ours(model.to(torch.bfloat16), views)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
