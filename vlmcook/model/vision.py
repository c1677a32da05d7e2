"""SigLIP NaViT vision tower (`vpm`): packed patches of many views -> one feature per patch.

- Attribute names equal the released weight keys under `vpm.` (docs/reference.md 3), so the released state_dict
  loads directly (and so does transformers' `Idefics2VisionTransformer`'s, which has the same layout).
- Views of any size are packed, never padded: every Linear / LayerNorm / MLP runs on the packed `[N, D]` tensor.
  Only attention needs per-view structure; the packed sequence is reordered once so that views of equal length sit
  next to each other, and each run of equal-length views is one batched SDPA call on a zero-copy view.
- The patch Conv2d (kernel = stride = patch) is applied as a Linear on flattened patches: identical math, and it
  works on packed patches of different views.
- Position ids follow the *released* NaViT rule bit for bit: float32 `torch.arange` / `torch.bucketize` on the CPU
  (docs/reference.md 4.3, 10.1). Integer `floor(side * k / n)` or transformers' `k * (1/n)` give different ids for
  some n (25, 49, 50, 55, 58, ...), and the weights were trained with the released rounding.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmcook.config import VisionConfig


# ---- inputs -------------------------------------------------------------------------------------------------------
def patchify(view: Tensor, patch: int = 14) -> Tensor:
    """[C, H, W] -> [h*w, C*P*P]: row-major patches, each flattened in the conv weight's (C, kh, kw) order."""
    # Public helper (benchmarks and users call it on their own tensors): a ValueError, not an assert.
    if view.ndim != 3 or view.shape[1] % patch or view.shape[2] % patch or 0 in view.shape[1:]:
        raise ValueError(f"patchify expects one view [C, H, W] with H, W positive multiples of the patch size "
                         f"{patch}, got shape {tuple(view.shape)}")
    c, H, W = view.shape
    h, w = H // patch, W // patch
    x = view.reshape(c, h, patch, w, patch).permute(1, 3, 0, 2, 4)  # [h, w, C, P, P]
    return x.reshape(h * w, c * patch * patch)


@lru_cache(maxsize=4096)
def _buckets(n: int, side: int) -> Tensor:
    """Bucket (0..side-1) of each of the n fractional coordinates k/n, exactly as the release computes it."""
    # The release divides 1 by an int32 tensor, so the step is float32(1/n), not the double 1/n: the two give
    # different buckets for n = 25, 49, 50, 55, 58, ... Everything is float32 on the CPU, whatever the defaults.
    step = (torch.ones((), dtype=torch.float32) / n).item()
    coords = torch.arange(0, 1 - 1e-6, step, dtype=torch.float32, device="cpu")  # [n]
    boundaries = torch.arange(1 / side, 1.0, 1 / side, dtype=torch.float32, device="cpu")  # [side-1]
    assert len(coords) == n, f"NaViT coordinates for n={n}: {len(coords)}"  # float arange; holds for n < ~10^6
    return torch.bucketize(coords, boundaries, right=True)


@lru_cache(maxsize=256)
def _position_ids(h: int, w: int, side: int) -> Tensor:
    return (_buckets(h, side)[:, None] * side + _buckets(w, side)[None, :]).flatten()  # [h*w]


def navit_position_ids(h: int, w: int, side: int) -> Tensor:
    """LongTensor [h*w]: row-major ids `bucket_row * side + bucket_col` into the side x side embedding table."""
    assert h >= 1 and w >= 1 and side >= 1, f"h={h} w={w} side={side}"
    return _position_ids(int(h), int(w), int(side)).clone()  # clone: the cached tensor must never be mutated


def packed_sizes(x: Tensor, tgt_sizes: Tensor) -> list[tuple[int, int]]:
    """(h, w) patch counts per view from tgt_sizes [V, 2]; the views' patches must be exactly the N rows of the
    packed x [N, width] (else a view would silently read its neighbour's rows). Shared by the tower and resampler."""
    sizes = [(int(h), int(w)) for h, w in tgt_sizes.tolist()]
    total = sum(h * w for h, w in sizes)
    assert all(h >= 1 and w >= 1 for h, w in sizes), "tgt_sizes holds a view of 0 patches"
    assert total == x.shape[0], f"tgt_sizes: {len(sizes)} views of {total} patches, x has {x.shape[0]} rows"
    return sizes


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive equal lengths as (views, length) pairs: [4, 4, 9, 4] -> [(2, 4), (1, 9), (1, 4)]."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1] = (runs[-1][0] + 1, n)
        else:
            runs.append((1, n))
    return runs


def _plan(lengths: list[int]) -> tuple[Tensor | None, list[tuple[int, int]]]:
    """Token permutation that puts equal-length views side by side (None if they already are), and its runs."""
    runs = _runs(lengths)
    if len(runs) == len(set(lengths)):  # every length already forms one run (e.g. all views the same size)
        return None, runs
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # stable: equal lengths keep their order
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    perm = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in order])  # [N]
    return perm, _runs([lengths[i] for i in order])


# ---- modules ------------------------------------------------------------------------------------------------------
class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.num_patches_per_side
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(self.side * self.side, cfg.hidden_size)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        # The conv with kernel = stride = P is a Linear over each flattened (C, kh, kw) patch: [N, C*P*P] -> [N, D]
        w = self.patch_embedding.weight
        x = F.linear(patches, w.reshape(w.shape[0], -1), self.patch_embedding.bias)
        return x + self.position_embedding(position_ids)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: Tensor, runs: list[tuple[int, int]]) -> Tensor:
        N, D = x.shape
        q, k, v = (p(x).view(N, self.n_head, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        outs, start = [], 0
        for views, length in runs:
            # a run of `views` equal-length views is a zero-copy slice [G*L, H, hd] -> [G, H, L, hd]
            end = start + views * length
            qs, ks, vs = (t[start:end].view(views, length, self.n_head, self.head_dim).transpose(1, 2)
                          for t in (q, k, v))
            # SDPA accumulates the softmax in fp32 for bf16/fp16 inputs (the reference upcasts the same way)
            y = F.scaled_dot_product_attention(qs, ks, vs, scale=self.scale)  # [G, H, L, hd]
            outs.append(y.transpose(1, 2).reshape(end - start, D))
            start = end
        return self.out_proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, runs: list[tuple[int, int]]) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), runs)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: Tensor, tgt_sizes: Tensor) -> Tensor:
        """patches [N, 3*P*P] (views concatenated, row-major within a view), tgt_sizes [V, 2] (h, w) -> [N, D]."""
        cfg = self.cfg
        sizes = packed_sizes(patches, torch.as_tensor(tgt_sizes))
        weight = self.embeddings.patch_embedding.weight
        if not sizes:  # no views at all (a text-only batch)
            return weight.new_zeros(0, cfg.hidden_size)
        side = cfg.num_patches_per_side
        pos = torch.cat([_position_ids(h, w, side) for h, w in sizes]).to(weight.device)  # [N]
        perm, runs = _plan([h * w for h, w in sizes])
        patches = patches.to(device=weight.device, dtype=weight.dtype)
        if perm is not None:  # equal-length views side by side; every op but attention is per token anyway
            perm = perm.to(weight.device)
            patches, pos = patches[perm], pos[perm]
        x = self.embeddings(patches, pos)  # [N, D]
        for layer in self.encoder.layers:
            x = layer(x, runs)
        x = self.post_layernorm(x)
        if perm is not None:
            x = torch.empty_like(x).index_copy_(0, perm, x)  # back to the caller's view order
        return x
