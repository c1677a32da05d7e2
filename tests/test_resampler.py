"""Resampler: sincos values by hand, torch MultiheadAttention as the attention oracle, package invariances, errors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmcook.config import MiniCPMVConfig, ResamplerConfig
from vlmcook.model.resampler import Resampler, pos_embed_2d, temporal_embed

CFG = ResamplerConfig(num_queries=8, embed_dim=64, num_heads=4, kv_dim=32)
D, Q = CFG.embed_dim, CFG.num_queries


def make_model(cfg: ResamplerConfig = CFG) -> Resampler:
    m = Resampler(cfg).eval()
    with torch.no_grad():  # move every parameter off its init (LN 1/0, zero biases) so all of them matter
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def make_input(sizes):
    n = sum(h * w for h, w in sizes)
    return torch.randn(n, CFG.kv_dim), torch.tensor(sizes, dtype=torch.long)


# ---- hand-derived sincos (float64 math, no shared code) -------------------------------------------------------

def hand_pos2d(r: int, c: int, dim: int) -> torch.Tensor:
    w = [10000 ** (-k / (dim / 4)) for k in range(dim // 4)]
    vals = ([math.sin(c * x) for x in w] + [math.cos(c * x) for x in w]
            + [math.sin(r * x) for x in w] + [math.cos(r * x) for x in w])
    return torch.tensor(vals, dtype=torch.float64)


def hand_temp(t: int, dim: int) -> torch.Tensor:
    w = [10000 ** (-k / (dim / 2)) for k in range(dim // 2)]
    return torch.tensor([math.sin(t * x) for x in w] + [math.cos(t * x) for x in w], dtype=torch.float64)


@pytest.mark.parametrize("dim", [64, 4096])
def test_sincos_spot_values(dim):
    q = dim // 4
    zeros, ones = torch.zeros(q), torch.ones(q)
    pos = pos_embed_2d(2, 2, dim)  # [h, w, dim]
    assert pos.dtype == torch.float32 and pos.shape == (2, 2, dim)
    assert torch.equal(pos[0, 0], torch.cat([zeros, ones, zeros, ones]))
    w = torch.tensor([10000 ** (-k / q) for k in range(q)], dtype=torch.float64)
    # (r=0, c=1): the column is encoded in the FIRST half, the row half stays at position 0
    assert torch.allclose(pos[0, 1, :q].double(), torch.sin(w), atol=1e-6)
    assert torch.allclose(pos[0, 1, q:2 * q].double(), torch.cos(w), atol=1e-6)
    assert torch.equal(pos[0, 1, 2 * q:], torch.cat([zeros, ones]))
    # (r=1, c=0): the row lives in the second half
    assert torch.equal(pos[1, 0, :2 * q], torch.cat([zeros, ones]))
    assert torch.allclose(pos[1, 0, 2 * q:3 * q].double(), torch.sin(w), atol=1e-6)
    assert torch.allclose(pos[1, 1].double(), hand_pos2d(1, 1, dim), atol=1e-6)

    temp = temporal_embed([0, 1, 42, 599, -1], dim)
    assert torch.equal(temp[0], torch.cat([torch.zeros(dim // 2), torch.ones(dim // 2)]))
    for i, t in enumerate([1, 42, 599]):
        # the float32 argument t * w_k (as in the reference) is off by up to ~2e-7 * t from the exact one
        assert torch.allclose(temp[i + 1].double(), hand_temp(t, dim), atol=1e-6 + 3e-7 * t)
    assert torch.equal(temp[4], torch.zeros(dim))  # -1 = no temporal term


def test_sincos_bits_match_float32_grid_arithmetic():
    """docs/reference.md 5.1/5.2: the released tables are computed in numpy float32 over the whole grid (meshgrid of w-then-h,
    outer product with omega, sin/cos). Our factored per-axis tables must give the same bits, not just close."""
    def omega(n):
        om = np.arange(n, dtype=np.float32)
        om /= float(n)
        return (1.0 / 10000 ** om).astype(np.float32)

    H, W = 101, 10  # beyond the reference's initial 70x70
    gw, gh = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))  # [H, W] each
    om = omega(D // 4)
    halves = [np.einsum("hw,d->hwd", g, om) for g in (gw, gh)]
    grid = np.concatenate([f(a) for a in halves for f in (np.sin, np.cos)], axis=-1)
    assert torch.equal(pos_embed_2d(H, W, D), torch.from_numpy(grid))

    ids = [0, 3, 42, 71999, 80000]
    arg = np.arange(80001, dtype=np.float32)[:, None] * omega(D // 2)[None]
    table = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    assert torch.equal(temporal_embed(ids, D), torch.from_numpy(table[ids]))


# ---- oracle: hand-written kv/LN/pos + torch.nn.MultiheadAttention (sequence-first) -----------------------------

def hand_ln(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def oracle_mha(m: Resampler) -> torch.nn.MultiheadAttention:
    mha = torch.nn.MultiheadAttention(D, CFG.num_heads, batch_first=False).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(m.attn.in_proj_weight)
        mha.in_proj_bias.copy_(m.attn.in_proj_bias)
        mha.out_proj.weight.copy_(m.attn.out_proj.weight)
        mha.out_proj.bias.copy_(m.attn.out_proj.bias)
    return mha


def oracle_kv(m, x, sizes, packages):
    """Per package: (keys [L, D], values [L, D]) built view by view, the slow obvious way."""
    out, row, view = [], 0, 0
    for p in packages:
        ks, vs = [], []
        for t in p:
            h, w = sizes[view]
            u = hand_ln(x[row:row + h * w] @ m.kv_proj.weight.T, m.ln_kv)
            pos = torch.stack([hand_pos2d(r, c, D) for r in range(h) for c in range(w)]).float()
            k = u + pos + (hand_temp(t, D).float() if t >= 0 else 0)
            ks.append(k), vs.append(u)
            row, view = row + h * w, view + 1
        out.append((torch.cat(ks), torch.cat(vs)))
    return out


def oracle_post(m, a):
    return hand_ln(a, m.ln_post) @ m.proj


@torch.no_grad()
@pytest.mark.parametrize("sizes,packages", [
    ([(4, 5)], [[-1]]),
    ([(101, 10)], [[-1]]),  # more than 70 patches per side: the table just grows
    ([(3, 4), (3, 4), (3, 4)], [[2, 5, 8]]),
])
def test_single_package_matches_mha_oracle(sizes, packages):
    m = make_model()
    x, tgt = make_input(sizes)
    mha = oracle_mha(m)
    (k, v), = oracle_kv(m, x, sizes, packages)
    q = hand_ln(m.query, m.ln_q)
    want = oracle_post(m, mha(q[:, None], k[:, None], v[:, None], need_weights=False)[0][:, 0])
    got = m(x, tgt, packages)
    assert got.shape == (1, Q, D)
    torch.testing.assert_close(got[0], want, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_padded_batch_matches_mha_oracle_with_key_padding_mask():
    # lengths 20, 18, 14, 12, 6, 20, 18: equal-length packages are batched together and must come back in order
    sizes = [(4, 5), (3, 3), (3, 3), (2, 7), (2, 2), (2, 2), (2, 2), (6, 1), (5, 4), (3, 6)]
    packages = [[-1], [3, 4], [-1], [10, 11, 12], [-1], [-1], [7]]
    m = make_model()
    x, tgt = make_input(sizes)
    kv = oracle_kv(m, x, sizes, packages)
    L = max(k.shape[0] for k, _ in kv)
    k = torch.stack([F.pad(k, (0, 0, 0, L - k.shape[0])) for k, _ in kv], dim=1)  # [L, G, D] sequence-first
    v = torch.stack([F.pad(v, (0, 0, 0, L - v.shape[0])) for _, v in kv], dim=1)
    mask = torch.stack([torch.arange(L) >= kk.shape[0] for kk, _ in kv])  # [G, L], True = padding, ignore
    q = hand_ln(m.query, m.ln_q)[:, None].expand(Q, len(packages), D)
    attn = oracle_mha(m)(q, k, v, key_padding_mask=mask, need_weights=False)[0]  # [Q, G, D]
    want = oracle_post(m, attn.transpose(0, 1))
    got = m(x, tgt, packages)
    assert got.shape == (len(packages), Q, D)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ---- invariances ---------------------------------------------------------------------------------------------

def run(m, items):
    """items: list of (x_views [list of [h*w, kv]], sizes, package ids) -> outputs [G, Q, D]."""
    x = torch.cat([xv for xs, _, _ in items for xv in xs])
    tgt = torch.tensor([s for _, sizes, _ in items for s in sizes])
    return m(x, tgt, [ids for _, _, ids in items])


def item(sizes, ids):
    return [torch.randn(h * w, CFG.kv_dim) for h, w in sizes], sizes, ids


@torch.no_grad()
def test_output_independent_of_batch_composition_order_and_chunking():
    m = make_model()
    items = [item([(4, 5)], [-1]), item([(3, 3)] * 2, [3, 4]), item([(2, 7)], [-1]),
             item([(2, 2)] * 3, [10, 11, 12]), item([(9, 1)], [-1]), item([(5, 4)], [-1]), item([(6, 3)], [8])]
    together = run(m, items)
    alone = torch.cat([run(m, [it]) for it in items])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    order = [3, 6, 0, 4, 2, 5, 1]
    shuffled = run(m, [items[i] for i in order])
    torch.testing.assert_close(shuffled, together[order], atol=1e-6, rtol=1e-5)
    m.max_rows_per_call = 20  # forces several chunks, one package longer than the limit
    torch.testing.assert_close(run(m, items), together, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_images_are_pure_2d_and_ids_only_touch_video_packages():
    m = make_model()
    sizes = [(4, 5), (2, 7), (3, 3)]
    x, tgt = make_input(sizes)
    pure = m(x, tgt)  # packages=None: every view its own image
    torch.testing.assert_close(m(x, tgt, [[-1], [-1], [-1]]), pure, atol=0, rtol=0)
    for i, (h, w) in enumerate(sizes):  # each image equals the 2-D oracle with no temporal term
        (k, v), = oracle_kv(m, x[sum(a * b for a, b in sizes[:i]):][:h * w], [(h, w)], [[-1]])
        q = hand_ln(m.query, m.ln_q)
        want = oracle_post(m, oracle_mha(m)(q[:, None], k[:, None], v[:, None], need_weights=False)[0][:, 0])
        torch.testing.assert_close(pure[i], want, atol=2e-5, rtol=1e-4)

    items = [item([(4, 5)], [-1]), item([(3, 3)] * 3, [1, 2, 3]), item([(2, 7)], [-1])]
    a = run(m, items)
    items[1] = (items[1][0], items[1][1], [40, 50, 60])
    b = run(m, items)
    assert torch.equal(a[[0, 2]], b[[0, 2]])  # images untouched
    assert (a[1] - b[1]).abs().max() > 1e-3  # the video package sees its new ids


@torch.no_grad()
def test_frames_permuted_with_their_ids_is_invariant_ids_alone_are_not():
    m = make_model()
    frames = [torch.randn(6, CFG.kv_dim) for _ in range(4)]
    sizes, ids = [(2, 3)] * 4, [5, 9, 14, 20]
    out = run(m, [(frames, sizes, ids)])
    assert out.shape == (1, Q, D)  # a package of n frames -> exactly one output
    perm = [2, 0, 3, 1]
    same = run(m, [([frames[i] for i in perm], sizes, [ids[i] for i in perm])])
    torch.testing.assert_close(same, out, atol=1e-5, rtol=1e-5)
    other = run(m, [(frames, sizes, [ids[i] for i in perm])])
    assert (other - out).abs().max() > 1e-3


def test_gradients_reach_every_parameter_and_bf16_runs():
    m = make_model().train()
    x, tgt = make_input([(3, 4), (3, 4), (2, 5)])
    x.requires_grad_(True)
    m(x, tgt, [[1, 2], [-1]]).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        want = m(x, tgt, [[1, 2], [-1]])
        got = m.to(torch.bfloat16)(x.to(torch.bfloat16), tgt, [[1, 2], [-1]])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.1)


# ---- bad input -----------------------------------------------------------------------------------------------

# The processor validates user input; these internal invariants are asserted because breaking them would give a
# silent wrong answer (views shifted between packages, NaN from a package without keys, -1 mixed with frame times).
@pytest.mark.parametrize("x_rows,tgt,packages,match", [
    (19, [(4, 5)], [[-1]], "tgt_sizes: 1 views of 20 patches, x has 19 rows"),
    (20, [(4, 5)], [[-1], [-1]], "packages cover 2 views, tgt_sizes 1"),
    (40, [(4, 5), (4, 5)], [[-1, -1, -1]], "packages cover 3 views, tgt_sizes 2"),
    (40, [(4, 5), (4, 5)], [[-1, 3]], r"package \[-1, 3\]: need all -1"),
    (40, [(4, 5), (4, 5)], [[-1], [-2]], r"package \[-2\]: need all -1"),
    (40, [(4, 5), (4, 5)], [[-1, -1], []], r"package \[\]: need all -1"),
    (0, [(0, 5)], [[-1]], "a view of 0 patches"),
])
def test_broken_invariants_are_asserted(x_rows, tgt, packages, match):
    m = Resampler(CFG)
    with pytest.raises(AssertionError, match=match):
        m(torch.randn(x_rows, 32), torch.tensor(tgt), packages)


def test_empty_batch_and_numpy_ids():
    m = Resampler(CFG)
    assert m(torch.randn(0, 32), torch.zeros(0, 2, dtype=torch.long), []).shape == (0, Q, D)
    assert m(torch.randn(20, 32), torch.tensor([[4, 5]]), [[np.int32(7)]]).shape == (1, Q, D)  # numpy ids ok


# ---- checkpoint layout ---------------------------------------------------------------------------------------

def test_parameter_names_and_shapes_match_released_checkpoint(reference_dir):
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"]
    released = {k[len("resampler."):] for k in index if k.startswith("resampler.")}
    with torch.device("meta"):
        m = Resampler(MiniCPMVConfig.from_name("v4_5").resampler)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert set(shapes) == released
    # shapes from the checkpoint table of docs/reference.md 3
    assert shapes["query"] == (64, 4096) and shapes["kv_proj.weight"] == (4096, 1152)
    assert shapes["attn.in_proj_weight"] == (12288, 4096) and shapes["attn.in_proj_bias"] == (12288,)
    assert shapes["attn.out_proj.weight"] == (4096, 4096) and shapes["proj"] == (4096, 4096)
    assert m.attn.num_heads == 32
