"""Vision tower + resampler on a batch of mixed-size views: packed (ours) vs padded (the reference's approach).

The reference pads every view of a call to the longest one and runs the tower on [B, Lmax, D] with a key-padding
mask; its resampler pads every package to the longest package. "padded" below restates that with *our* modules'
weights and the same SDPA kernels, so the only difference measured is the padding. Both paths' outputs are compared
(they must agree) before timing.

Two batches:
- released: what a multi-image prompt produces with the released slicing rules (a 1920x1080 photo = 9 views, a
  1000x600 screenshot = 3, a 448x448 icon = 1, a 100x1000 strip = 1) plus 6 video frames in packages of 3. Those
  rules make every view ~1024 patches, so the tower pads little; the resampler still pads single views to 3 frames.
- mixed: views made at different scale resolutions (what training batches that mix sources, or lower-resolution
  video frames, look like): here padding costs the tower too.

Usage: python benchmarks/bench_vision_packing.py [--width 384] [--layers 4] [--reps 3] [--scenario both]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from vlmcook.config import PRESETS, ResamplerConfig
from vlmcook.data.image import image_layout
from vlmcook.model.resampler import Resampler, pos_embed_2d, temporal_embed
from vlmcook.model.vision import VisionTransformer, navit_position_ids, patchify


def batch_sizes(scenario: str) -> tuple[list[tuple[int, int]], list[list[int]]]:
    if scenario == "mixed":  # views made at different scale_resolutions (e.g. 448-px pages with 224-px frames)
        sizes = [(32, 32), (24, 43), (16, 16), (12, 21), (8, 8)] + [(12, 21)] * 6
        return sizes, [[-1]] * 5 + [[5, 10, 15], [20, 25, 30]]
    sizes, packages = [], []
    for W, H in [(1920, 1080), (1000, 600), (448, 448), (100, 1000)]:
        layout = image_layout((W, H), 448, 9, 14)
        sizes += [tuple(t) for t in layout.tgt_sizes]
        packages += [[-1]] * layout.n_views
    video = image_layout((1280, 720), 448, 1, 14)  # frames: one view each, as the released video path
    sizes += [tuple(video.tgt_sizes[0])] * 6
    packages += [[5, 10, 15], [20, 25, 30]]
    return sizes, packages


def padded_tower(vpm: VisionTransformer, views: list[torch.Tensor], sizes) -> torch.Tensor:
    """The reference's way: [B, Lmax] with zero patches and a key mask; returns the real rows packed."""
    P, side = vpm.cfg.patch_size, vpm.cfg.num_patches_per_side
    lens = [h * w for h, w in sizes]
    B, L = len(views), max(lens)
    patches = torch.zeros(B, L, 3 * P * P)
    pos = torch.zeros(B, L, dtype=torch.long)
    keep = torch.zeros(B, L, dtype=torch.bool)
    for i, (v, (h, w)) in enumerate(zip(views, sizes)):
        patches[i, :lens[i]] = patchify(v, P)
        pos[i, :lens[i]] = navit_position_ids(h, w, side)
        keep[i, :lens[i]] = True
    w = vpm.embeddings.patch_embedding.weight
    x = F.linear(patches, w.reshape(w.shape[0], -1), vpm.embeddings.patch_embedding.bias)
    x = x + vpm.embeddings.position_embedding(pos)  # [B, L, D]
    mask = keep[:, None, None, :]  # padded keys masked, as the reference's eager path does
    for layer in vpm.encoder.layers:
        a = layer.self_attn
        y = layer.layer_norm1(x)
        q, k, v = (p(y).view(B, L, a.n_head, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scale)
        x = x + a.out_proj(o.transpose(1, 2).reshape(B, L, -1))
        x = x + layer.mlp(layer.layer_norm2(x))
    return vpm.post_layernorm(x)[keep]  # [N, D]


def padded_resampler(rs: Resampler, x: torch.Tensor, sizes, packages) -> torch.Tensor:
    """Every package padded to the longest one, one masked attention batch (the reference's batch path)."""
    D, heads = rs.query.shape[1], rs.attn.num_heads
    u = rs.ln_kv(rs.kv_proj(x))  # [N, D]
    keys, offs = [], 0
    view = 0
    for pack in packages:
        ks = []
        for t in pack:
            h, w = sizes[view]
            n = h * w
            k = u[offs:offs + n] + pos_embed_2d(h, w, D).reshape(n, D)
            if t >= 0:
                k = k + temporal_embed([t], D)
            ks.append((k, u[offs:offs + n]))
            offs += n
            view += 1
        keys.append((torch.cat([k for k, _ in ks]), torch.cat([v for _, v in ks])))
    G, L = len(keys), max(len(k) for k, _ in keys)
    K, V = torch.zeros(G, L, D), torch.zeros(G, L, D)
    keep = torch.zeros(G, L, dtype=torch.bool)
    for g, (k, v) in enumerate(keys):
        K[g, :len(k)], V[g, :len(v)], keep[g, :len(k)] = k, v, True
    Wq, Wk, Wv = rs.attn.in_proj_weight.chunk(3)
    bq, bk, bv = rs.attn.in_proj_bias.chunk(3)
    q = F.linear(rs.ln_q(rs.query), Wq, bq).view(1, -1, heads, D // heads).transpose(1, 2).expand(G, -1, -1, -1)
    k = F.linear(K, Wk, bk).view(G, L, heads, D // heads).transpose(1, 2)
    v = F.linear(V, Wv, bv).view(G, L, heads, D // heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    o = rs.attn.out_proj(o.transpose(1, 2).reshape(G, -1, D))
    return rs.ln_post(o) @ rs.proj


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=384, help="vision hidden size (default 384)")
    ap.add_argument("--layers", type=int, default=4, help="vision layers (default 4)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scenario", choices=["released", "mixed", "both"], default="both",
                    help="released: views from the released slicing rules (all ~1024 patches); mixed: views made at "
                         "different scale resolutions")
    args = ap.parse_args()
    for scenario in (["released", "mixed"] if args.scenario == "both" else [args.scenario]):
        run(args, scenario)


def run(args, scenario: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    vcfg = replace(PRESETS["v4_5"].vision, hidden_size=args.width, intermediate_size=4 * args.width,
                   num_hidden_layers=args.layers, num_attention_heads=args.width // 64)
    rcfg = ResamplerConfig(num_queries=64, embed_dim=512, num_heads=4, kv_dim=args.width)
    vpm, rs = VisionTransformer(vcfg).eval(), Resampler(rcfg).eval()
    sizes, packages = batch_sizes(scenario)
    views = [torch.rand(3, 14 * h, 14 * w) * 2 - 1 for h, w in sizes]
    tgt = torch.tensor(sizes)
    patches = torch.cat([patchify(v) for v in views])
    real, padded = sum(h * w for h, w in sizes), len(sizes) * max(h * w for h, w in sizes)
    with torch.no_grad():
        ours = rs(vpm(patches, tgt), tgt, packages)
        ref = padded_resampler(rs, padded_tower(vpm, views, sizes), sizes, packages)
        err = (ours - ref).abs().max().item()
        assert err < 1e-3, f"packed and padded disagree by {err}"
        t_vp = timed(lambda: vpm(patches, tgt), args.reps)
        t_vd = timed(lambda: padded_tower(vpm, views, sizes), args.reps)
        feats = vpm(patches, tgt)
        t_rp = timed(lambda: rs(feats, tgt, packages), args.reps)
        t_rd = timed(lambda: padded_resampler(rs, feats, sizes, packages), args.reps)
    print(f"\n[{scenario}] batch: {len(sizes)} views, {len(packages)} packages; {real} real patches, {padded} when padded "
          f"({padded / real:.2f}x); vision width {args.width} x {args.layers} layers; max |diff| {err:.1e}")
    print(f"{'part':12s} {'packed s':>9s} {'padded s':>9s} {'padded/packed':>14s}")
    for name, a, b in [("vision", t_vp, t_vd), ("resampler", t_rp, t_rd), ("total", t_vp + t_rp, t_vd + t_rd)]:
        print(f"{name:12s} {a:9.3f} {b:9.3f} {b / a:13.2f}x")


if __name__ == "__main__":
    main()
