"""Qwen3 decoder (`llm`) with a preallocated KV cache.

- Attribute names are the released checkpoint keys under `llm.` (`model.layers.i.self_attn.q_proj`, ...,
  `lm_head`); there are no buffers, so `state_dict()` holds exactly the released tensors.
- Numerics follow the reference (HF Qwen3): RMSNorm in fp32 then cast back before the weight multiply; RoPE cos/sin
  computed in fp32 from positions on the fly and cast to the activation dtype; per-head `q_norm`/`k_norm` before RoPE.
- Attention is `F.scaled_dot_product_attention` with `enable_gqa` (no repeated K/V). A padding mask (1 = real,
  0 = pad, any side) is combined with the causal mask; every query row also sees its own key, so a pad query never
  has a fully masked row (its output is finite garbage, real rows are unaffected).
- `KVCache` preallocates `[B, kv_heads, max_len, head_dim]` per layer and remembers which cached positions are real
  tokens, so decode steps need no mask and default positions stay right for left-padded rows.
- Sequence packing (training, no cache): `segment_ids [B, T]` (0 = padding, k = k-th sample of the row) gives a
  block-diagonal causal mask and, by default, positions restarting at 0 for each sample.
- `Qwen3Model.gradient_checkpointing` (plain bool) recomputes each layer in backward when training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmcook.config import LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back *before* scaling: the reference does this, and bf16 results depend on it.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, T] -> cos, sin [B, T, head_dim] (the two halves repeat: half-rotation layout)."""
    # inv_freq = theta^(-2i/head_dim), computed in fp32 exactly as the reference's (non-persistent) buffer.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device)
                                / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd], cos/sin [B, T, hd]: rotate the pairs (x_i, x_{i+hd/2})."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Preallocated keys/values for incremental decoding of a batch.

    `k[i]`, `v[i]`: `[B, kv_heads, max_len, head_dim]` for layer i; positions `[0, length)` are filled.
    `mask`: `[B, max_len]` bool, True where the cached position is a real token (False = padding).
    All rows share `length`; rows of different lengths are left-padded by the caller.
    """

    def __init__(self, cfg: LLMConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def extend(self, key_mask: torch.Tensor | None, t: int) -> tuple[int, torch.Tensor]:
        """Claim the next t positions. key_mask [B, past+t] (None = the new tokens are real) overrides the stored
        mask. Returns (past length, padding mask [B, past+t] bool of everything cached so far)."""
        past = self.length
        # The mask write below would silently clip at max_len; the engine sizes the cache to prompt + max_new_tokens.
        assert past + t <= self.max_len, f"KVCache overflow: {past} + {t} > max_len {self.max_len}"
        if key_mask is None:
            self.mask[:, past:past + t] = True
        else:
            self.mask[:, :past + t] = key_mask
        return past, self.mask[:, :past + t]

    def update(self, layer: int, past: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, hd] at [past, past+T); return all keys/values [B, kv_heads, past+T, hd]."""
        end = past + k.shape[2]
        self.k[layer][:, :, past:end] = k
        self.v[layer][:, :, past:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: Sequence[int] | torch.Tensor) -> "KVCache":
        """Keep only these batch rows, in this order (drop finished requests or reorder). In place; returns self."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        # a negative index would silently pick a row from the end
        assert rows.ndim == 1 and bool(((rows >= 0) & (rows < self.batch_size)).all()), \
            f"rows {rows.tolist()} of {self.batch_size}"
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.mask = self.mask[rows]
        return self


def attention_mask_for(key_mask: torch.Tensor | None, past: int, t: int) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, T, past+T] (True = attend) from a key padding mask [B, past+T], or None when plain
    causal attention (SDPA's `is_causal`, valid only without a past) or no mask at all (one query) is exact."""
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None
    if key_mask is None and (past == 0 or t == 1):
        return None
    device = key_mask.device if key_mask is not None else None
    q_pos = torch.arange(past, past + t, device=device)[:, None]  # [T, 1] absolute query positions
    k_pos = torch.arange(past + t, device=device)[None, :]  # [1, S]
    causal = k_pos <= q_pos  # [T, S]
    if key_mask is None:
        return causal[None, None]
    # Each query also sees its own key, so a pad query (left padding) never has an empty row -> no NaN.
    mask = (causal[None] & key_mask[:, None, :]) | (k_pos == q_pos)[None]  # [B, T, S]
    return mask[:, None]


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, T] -> boolean SDPA mask [B, 1, T, T]: causal inside a segment, never across segments or to
    padding (0); the diagonal is always on so a pad query has no empty row."""
    T = segment_ids.shape[1]
    pos = torch.arange(T, device=segment_ids.device)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    mask = same & (pos[None, None, :] <= pos[None, :, None]) & (segment_ids[:, None, :] != 0)
    return (mask | torch.eye(T, dtype=torch.bool, device=segment_ids.device))[:, None]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids [B, T] -> position ids [B, T] counting from 0 at the start of each segment."""
    pos = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return pos - torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=1).values


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which KVCache slot this layer writes
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, past: int) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, H*hd] -> [B, T, H, hd]; per-head RMSNorm over hd, then -> [B, H, T, hd]; RoPE after the norm.
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, past, k, v)  # [B, n_kv, past+T, hd]
        # GQA: query head h reads kv head h // (n_heads / n_kv), the reference's repeat_kv grouping.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and past == 0 and T > 1,
                                           scale=self.head_dim ** -0.5, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, past: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, past)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """-> hidden states [B, T, D] after the final norm. attention_mask: [B, past+T], 1 = real, 0 = pad.
        segment_ids [B, T] (packed rows, no cache): replaces attention_mask; see segment_mask."""
        x = self._embed(input_ids, inputs_embeds)
        B, T, _ = x.shape
        if segment_ids is not None:
            return self._forward_packed(x, segment_ids, position_ids, cache)
        key_mask = self._key_mask(attention_mask, cache, B, T, x.device)  # [B, past+T] bool or None
        past = 0
        if cache is not None:  # the cache remembers the padding of earlier steps: decode needs no mask
            past, key_mask = cache.extend(key_mask, T)
        position_ids = self._positions(position_ids, key_mask, past, B, T, x.device)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = attention_mask_for(key_mask, past, T)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, past)
        if cache is not None:
            cache.length = past + T
        return self.norm(x)

    def _forward_packed(self, x: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor | None,
                        cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        assert cache is None, "segment_ids take no KVCache"  # this path never writes one: it would stay empty
        assert segment_ids.shape == (B, T), f"segment_ids {tuple(segment_ids.shape)}, x {B}x{T}"
        segment_ids = segment_ids.to(x.device)
        if position_ids is None:
            position_ids = segment_positions(segment_ids)
        position_ids = self._positions(position_ids, None, 0, B, T, x.device)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = segment_mask(segment_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        assert (input_ids is None) != (inputs_embeds is None), "give exactly one of input_ids, inputs_embeds"
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    @staticmethod
    def _key_mask(attention_mask: torch.Tensor | None, cache: KVCache | None, B: int, T: int,
                  device: torch.device) -> torch.Tensor | None:
        """-> the padding mask as bool [B, past+T] (None = all real)."""
        # A [1, ...] tensor would broadcast silently over a batch of B (cache writes, masks): shapes are exact.
        past = cache.length if cache is not None else 0
        assert cache is None or cache.batch_size == B, f"batch {B}, KVCache rows {cache.batch_size}"
        if attention_mask is None:
            return None
        assert attention_mask.shape == (B, past + T), f"attention_mask {tuple(attention_mask.shape)}, past {past}"
        return attention_mask.to(device=device, dtype=torch.bool)

    @staticmethod
    def _positions(position_ids: torch.Tensor | None, key_mask: torch.Tensor | None, past: int, B: int, T: int,
                   device: torch.device) -> torch.Tensor:
        """-> position ids [B, T]. Default: count of real tokens before each position (pads clamped to 0)."""
        if position_ids is not None:
            if position_ids.ndim == 1:
                position_ids = position_ids[None]
            assert position_ids.ndim == 2 and position_ids.shape[1] == T and position_ids.shape[0] in (1, B), \
                f"position_ids {tuple(position_ids.shape)}, x {B}x{T}"
            return position_ids.to(device).expand(B, T)
        if key_mask is None:  # no padding anywhere: arange continuing from the cache length
            return torch.arange(past, past + T, device=device)[None].expand(B, T)
        return (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied from embed_tokens
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # The reference's initializer_range; only matters for training from scratch (checkpoints overwrite it).
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """-> logits [B, T, V] (in the weights' dtype)."""
        return self.lm_head(self.model(input_ids, inputs_embeds, attention_mask, position_ids, cache))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KVCache on this model's device and dtype."""
        w = self.lm_head.weight
        return KVCache(self.cfg, batch_size, max_len, dtype=w.dtype, device=w.device)
