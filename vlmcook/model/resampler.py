"""Unified 2D/3D perceiver resampler (`resampler`): packed vision features -> `num_queries` tokens per package.

- One cross-attention layer (docs/reference.md 5): queries LN_q(query), no positional term; values
  u = LN_kv(kv_proj(x)); keys u + 2-D sincos(row, col) (+ temporal sincos(t) for frames, t >= 0); LN_post(attn) @ proj.
- A *package* (temporal ids, docs/reference.md 5.4) is a run of consecutive views whose keys/values are concatenated
  view-major and attended jointly -> exactly one output. Images are packages `[-1]`. A package is all -1 or all
  >= 0 (video frames); the processor builds them, the model asserts they never mix.
- Sincos tables are computed on the fly for any size with the release's float32 arithmetic and order, so the bits
  match (**column first**, docs/reference.md 5.1); docs/architecture.md "Resampler numerics" says how.
- Attention is our `PackedCrossAttention` over the released `attn.in_proj_weight/in_proj_bias/out_proj` (rows
  Q|K|V). Packages of equal key length are batched together: no key is padded, no mask is needed, and a package's
  output cannot depend on the rest of the batch (the release's per-group path masks the wrong keys,
  docs/reference.md 10.6). K/V projections run once on the packed [N, D] rows, before grouping.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmcook.config import ResamplerConfig
from vlmcook.model.vision import packed_sizes


# ---- sincos tables (numpy float32, as the reference computes them) --------------------------------------------

def _sincos_1d(pos: np.ndarray, dim: int) -> np.ndarray:
    """pos [M] float32 -> [M, dim] = [sin(pos * w), cos(pos * w)], w_k = 10000^(-k/(dim/2)), all in float32."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0  # float32 / python float stays float32
    omega = 1.0 / 10000 ** omega
    out = pos.astype(np.float32)[:, None] * omega[None, :]  # [M, dim/2], one float32 multiply per entry
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


@lru_cache(maxsize=8)
def _axis_table(size: int, dim: int) -> torch.Tensor:
    """[size, dim/2] float32: the sincos of one 2-D axis (positions 0..size-1), half of the 2-D embedding."""
    return torch.from_numpy(_sincos_1d(np.arange(size, dtype=np.float32), dim // 2))


def _axis_table_for(n: int, dim: int) -> torch.Tensor:
    # Round the cached size up so a stream of slightly different view sizes reuses one table.
    return _axis_table(max(70, 64 * math.ceil(n / 64)), dim)


def pos_embed_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """[h, w, dim] float32; pos[r, c] = [sin(c w), cos(c w), sin(r w), cos(r w)] (column half first)."""
    table = _axis_table_for(max(h, w), dim)
    cols = table[:w].unsqueeze(0).expand(h, w, dim // 2)
    rows = table[:h].unsqueeze(1).expand(h, w, dim // 2)
    return torch.cat([cols, rows], dim=-1)


def temporal_embed(ids: list[int], dim: int) -> torch.Tensor:
    """[len(ids), dim] float32; temp[t] = [sin(t w'), cos(t w')], w'_k = 10000^(-k/(dim/2)); id -1 -> zeros."""
    ids_np = np.asarray(ids, dtype=np.int64)
    out = _sincos_1d(np.maximum(ids_np, 0).astype(np.float32), dim)
    out[ids_np < 0] = 0.0  # -1 = no temporal embedding (the reference adds a zero vector)
    return torch.from_numpy(out)


def _patch_coords(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(view, row, col) of every patch of the packed views, each [N] long, N = sum(h * w); row-major per view."""
    hw = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
    n_per_view = hw[:, 0] * hw[:, 1]
    view = torch.repeat_interleave(torch.arange(len(sizes)), n_per_view)
    local = torch.arange(view.numel()) - (torch.cumsum(n_per_view, 0) - n_per_view)[view]  # index inside its view
    width = hw[view, 1]
    return view, local // width, local % width


def _chunks(sizes: list[tuple[int, int]], packages: list[list[int]], max_rows: int):
    """Split consecutive packages into chunks of <= max_rows key rows (a longer package gets a chunk of its own).
    Yields (first package, end package, first view, end view, first row, end row) of each chunk."""
    g0 = v0 = r0 = 0
    v, r = 0, 0
    for g, p in enumerate(packages):
        rows = sum(h * w for h, w in sizes[v:v + len(p)])
        if r > r0 and r + rows - r0 > max_rows:
            yield g0, g, v0, v, r0, r
            g0, v0, r0 = g, v, r
        v, r = v + len(p), r + rows
    yield g0, len(packages), v0, v, r0, r


# ---- attention -----------------------------------------------------------------------------------------------

class PackedCrossAttention(nn.Module):
    """Multi-head cross-attention of shared queries over variable-length packages of packed keys/values.

    Parameters are laid out like torch's MultiheadAttention (so released `resampler.attn.*` keys load as is):
    `in_proj_weight [3D, D]` with rows Q|K|V, `in_proj_bias [3D]`, `out_proj` Linear(D, D).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                spans: list[tuple[int, int]]) -> torch.Tensor:
        """q [Q, D]; k, v [N, D] packed; spans = (start, length) row ranges of each package -> [G, Q, D]."""
        D, H = self.dim, self.num_heads
        wq, wk, wv = self.in_proj_weight.split(D)
        bq, bk, bv = self.in_proj_bias.split(D)
        # Projections are per row, so K/V run once on the packed rows (no padding), before grouping.
        q = F.linear(q, wq, bq).unflatten(-1, (H, -1)).transpose(0, 1)  # [H, Q, hd]
        k, v = F.linear(k, wk, bk), F.linear(v, wv, bv)  # [N, D]
        by_len: dict[int, list[int]] = {}
        for g, (_, length) in enumerate(spans):
            by_len.setdefault(length, []).append(g)
        outs, order = [], []
        for length, group in by_len.items():
            starts = torch.tensor([spans[g][0] for g in group], device=k.device)
            idx = (starts[:, None] + torch.arange(length, device=k.device)).flatten()  # [n_g * L] package rows
            kg = k.index_select(0, idx).view(len(group), length, H, -1).transpose(1, 2)  # [n_g, H, L, hd]
            vg = v.index_select(0, idx).view(len(group), length, H, -1).transpose(1, 2)
            o = F.scaled_dot_product_attention(q.expand(len(group), -1, -1, -1), kg, vg)  # [n_g, H, Q, hd]
            outs.append(o.transpose(1, 2).flatten(2))  # [n_g, Q, D]
            order += group
        out = torch.cat(outs)[torch.argsort(torch.tensor(order, device=q.device))]  # back to package order
        return self.out_proj(out)


# ---- resampler -----------------------------------------------------------------------------------------------

class Resampler(nn.Module):
    # Packages are processed in chunks of at most this many key rows: bounds the [rows, D] intermediates (u, keys,
    # K, V) for long videos (540 frames x 1024 patches would be 4 x 4.5 GB in bf16 at once). Outputs do not depend
    # on it: packages never interact.
    max_rows_per_call: int = 1 << 16

    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.query = nn.Parameter(torch.empty(cfg.num_queries, D))
        self.kv_proj = nn.Linear(cfg.kv_dim, D, bias=False)
        self.attn = PackedCrossAttention(D, cfg.num_heads)
        self.ln_q = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.ln_kv = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.ln_post = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(D, D))  # [in, out]: y = x @ proj
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The reference's init: trunc-normal(0.02) query/Linears, xavier in_proj, D^-0.5 randn proj, LN 1/0."""
        D = self.cfg.embed_dim
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.kv_proj.weight, std=0.02)
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        nn.init.zeros_(self.attn.in_proj_bias)
        nn.init.trunc_normal_(self.attn.out_proj.weight, std=0.02)
        nn.init.zeros_(self.attn.out_proj.bias)
        self.proj.copy_(torch.randn(D, D, device=self.proj.device) * D ** -0.5)
        for ln in (self.ln_q, self.ln_kv, self.ln_post):
            ln.reset_parameters()

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor,
                packages: list[list[int]] | None = None) -> torch.Tensor:
        """x [N, kv_dim] packed views (row-major patches); tgt_sizes [V, 2] (h, w); packages: temporal-id lists
        consumed in order from the views (None = every view is an image `[-1]`) -> [G, Q, D], G = len(packages)."""
        sizes = packed_sizes(x, tgt_sizes)
        packages = [[-1] for _ in sizes] if packages is None else packages
        # Views are consumed package by package: a count mismatch would silently drop or shift views, an empty
        # package would attend over no key (NaN), and -1 ("no temporal embedding") must not mix with frame times.
        n = sum(len(p) for p in packages)
        assert n == len(sizes), f"packages cover {n} views, tgt_sizes {len(sizes)}"
        bad = [p for p in packages if not p or not (all(t == -1 for t in p) or all(t >= 0 for t in p))]
        assert not bad, f"package {bad[0]}: need all -1 (image) or all >= 0 (frame times)"
        if not packages:
            return x.new_zeros(0, self.cfg.num_queries, self.cfg.embed_dim)
        q = self.ln_q(self.query)  # [Q, D], shared by every package
        outs = [self._resample(q, x[r0:r1], sizes[v0:v1], packages[g0:g1])
                for g0, g1, v0, v1, r0, r1 in _chunks(sizes, packages, self.max_rows_per_call)]
        return torch.cat(outs)

    def _resample(self, q: torch.Tensor, x: torch.Tensor, sizes: list[tuple[int, int]],
                  packages: list[list[int]]) -> torch.Tensor:
        """One chunk: x [n, kv_dim] holds exactly the views of `packages` -> [len(packages), Q, D]."""
        D = self.cfg.embed_dim
        u = self.ln_kv(self.kv_proj(x))  # [n, D] values, no padding anywhere
        view, rows, cols = (t.to(u.device) for t in _patch_coords(sizes))
        # The reference casts its float32 tables to the activation dtype, then adds: same bits here.
        table = _axis_table_for(max(max(s) for s in sizes), D).to(u.device, u.dtype)  # [side, D/2]
        keys = u + torch.cat([table[cols], table[rows]], dim=-1)  # [n, D], column half first
        ids = [t for p in packages for t in p]  # one temporal id per view
        if any(t >= 0 for t in ids):
            keys = keys + temporal_embed(ids, D).to(u.device, u.dtype)[view]  # -1 views get zeros

        spans, v, start = [], 0, 0  # (first row, number of rows) of each package inside the chunk
        for p in packages:
            length = sum(h * w for h, w in sizes[v:v + len(p)])
            spans.append((start, length))
            v, start = v + len(p), start + length
        out = self.attn(q, keys, u, spans)  # [G, Q, D]
        return self.ln_post(out) @ self.proj
