"""Initialisation for training a MiniCPM-V model from scratch (the release starts from a trained SigLIP, Qwen3 and
resampler; a toy model trained on a CPU in minutes does not).

Names and shapes stay the release's; only initial values change, and every weight is trained afterwards.
"""

from __future__ import annotations

import numpy as np
import torch

from vlmcook.model.resampler import _sincos_1d


def init_for_scratch(model, cells: list[tuple[int, int]]) -> None:
    """Initialisation for training from scratch (the release starts from a trained SigLIP and resampler).

    - Vision position embeddings at N(0, 0.02) instead of PyTorch's N(0, 1): with a 64-wide tower the unit-variance
      table would drown the patch embeddings (~0.1 scale) for the first thousands of steps.
    - Resampler queries that each start attending to one patch cell (`positional_queries`). With the reference
      init the 42 queries attend almost uniformly, i.e. each sees the mean of the page's patches, where one glyph's
      signal is ~1% of the background's; measured (a probe predicting a title's first 12 characters from the
      queries' outputs, 400 steps; benchmarks/bench_reading_probe.py): 0.13 held-out character accuracy with the
      reference init, 0.39 with this one (tape-typed pages, data/docs/grid.py).
    """
    torch.nn.init.normal_(model.vpm.embeddings.position_embedding.weight, std=0.02)
    positional_queries(model.resampler, cells)


@torch.no_grad()
def positional_queries(resampler, cells, sharpness: float = 3.0, content_gain: float = 0.05) -> None:
    """Make query i attend to patch cell cells[i] = (row, col) through the keys' 2-D sincos position embedding.

    keys = ln_kv(kv_proj(x)) + [sincos(col) | sincos(row)]; each axis half is [sin(p w_k) | cos(p w_k)] with
    w_k = 10000^(-k/(D/4)), and only the first few (highest) frequencies vary across a 14-cell view. So each head's
    query/key projection picks those dims, `f` frequencies per axis (sin and cos), f = head_dim / 4, scaled by
    `sharpness` (the logit gap to a neighbouring cell grows as sharpness^2); the query vector holds the position
    embedding of its cell in the same dims; `content_gain` scales ln_kv so patch content does not swamp the
    positions at first. Values and every other weight keep the reference init; all of it is trained afterwards.
    """
    D, H = resampler.cfg.embed_dim, resampler.cfg.num_heads
    hd, quarter = D // H, D // 4
    f = min(hd // 4, quarter // 2)
    # dims of [col sin | col cos | row sin | row cos], each `quarter` wide: the first f of each
    dims = [a * quarter + k for a in range(4) for k in range(f)]
    resampler.query.zero_()
    for i, (r, c) in enumerate(cells):
        pos = np.concatenate([_sincos_1d(np.array([c], np.float32), D // 2)[0],
                              _sincos_1d(np.array([r], np.float32), D // 2)[0]])  # [D]
        resampler.query[i, dims] = torch.from_numpy(pos[dims])
        # ln_q subtracts the vector's mean: spread the opposite of the chosen dims' sum over the other dims (which
        # the projections ignore) so the chosen dims come out of ln_q unshifted, just scaled
        rest = torch.ones(D, dtype=torch.bool)
        rest[dims] = False
        resampler.query[i, rest] = -float(pos[dims].sum()) / int(rest.sum())
    w = resampler.attn.in_proj_weight  # [3D, D], rows Q | K | V
    w[:2 * D].zero_()
    for h in range(H):
        for j, d in enumerate(dims):
            w[h * hd + j, d] = sharpness  # Q
            w[D + h * hd + j, d] = sharpness  # K
    resampler.ln_kv.weight.fill_(content_gain)
