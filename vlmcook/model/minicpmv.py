"""MiniCPM-V 4.5: vision tower -> unified resampler -> Qwen3, composed.

Notable:
- Attribute names `llm`, `vpm`, `resampler` are the released checkpoint's top-level prefixes: its state_dict loads
  with no conversion table.
- All views of a batch go through the vision tower packed (no padding), then through the resampler once; the outputs
  are split back per sample **by number of packages** (the reference splits by number of views, which misassigns
  video features for batch > 1: docs/reference.md 10.7).
- Each sample's `<unk>` spans must hold exactly `packages * query_num` positions (asserted: the processor builds
  them; a partial scatter would be a silent wrong answer).
- With labels, the LM head runs only on the positions that have a label: a 151k-wide vocabulary times every prompt
  position would otherwise dominate activation memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmcook.config import MiniCPMVConfig
from vlmcook.data.chat import IGNORE_INDEX
from vlmcook.model.llm import KVCache, Qwen3ForCausalLM
from vlmcook.model.resampler import Resampler
from vlmcook.model.vision import VisionTransformer, patchify


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V] when no labels are given
    loss: torch.Tensor | None  # mean cross-entropy over labelled tokens
    num_label_tokens: int = 0


class MiniCPMV(nn.Module):
    def __init__(self, config: MiniCPMVConfig):
        super().__init__()
        self.config = config
        self.llm = Qwen3ForCausalLM(config.llm)
        self.vpm = VisionTransformer(config.vision)
        self.resampler = Resampler(config.resampler)

    # ---- vision side ----------------------------------------------------------------------------------------
    def encode_views(self, views: list[torch.Tensor], packages: list[list[int]]) -> torch.Tensor:
        """views: V tensors [3, 14h, 14w]; packages: temporal-id lists consumed in order -> [G, Q, D]."""
        p = self.config.patch_size
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        device = self.vpm.embeddings.patch_embedding.weight.device
        tgt_sizes = torch.tensor([[v.shape[-2] // p, v.shape[-1] // p] for v in views], dtype=torch.long)
        # The tower runs in chunks of `vision_batch_size` views to bound activation memory on many-slice inputs;
        # chunks never split a package's views from each other in a way that matters (the tower is per-view).
        feats = []
        step = self.config.vision_batch_size
        for i in range(0, len(views), step):
            chunk = views[i:i + step]
            patches = torch.cat([patchify(v.to(device=device, dtype=dtype), p) for v in chunk])  # [N, 3*p*p]
            feats.append(self.vpm(patches, tgt_sizes[i:i + step]))  # [N, Dv]
        return self.resampler(torch.cat(feats), tgt_sizes, packages)  # [G, Q, D]

    # ---- text + vision embeddings ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values=None, temporal_ids=None,
              image_bound=None) -> torch.Tensor:
        """Token embeddings [B, T, D] with every `<unk>` span overwritten by its resampler output, in order."""
        embeds = self.llm.model.embed_tokens(input_ids)
        if not pixel_values or not any(len(v) for v in pixel_values):
            # else the `<unk>` slots would silently keep their text embeddings
            assert image_bound is None or not any(len(b) for b in image_bound), "image_bound without pixel_values"
            return embeds
        B, T = input_ids.shape
        assert len(pixel_values) == len(temporal_ids) == len(image_bound) == B, \
            f"B={B}: {len(pixel_values)} pixel_values, {len(temporal_ids)} temporal_ids, {len(image_bound)} bounds"
        Q = self.config.query_num
        all_views = [v for views in pixel_values for v in views]
        all_packages = [p for packs in temporal_ids for p in packs]
        visual = self.encode_views(all_views, all_packages).to(embeds.dtype)  # [G, Q, D]
        out = embeds.clone()
        start = 0
        for b in range(B):
            n = len(temporal_ids[b])
            feats = visual[start:start + n].reshape(n * Q, visual.shape[-1])  # [n*Q, D]; n = 0: a text-only row
            start += n
            pos = _bound_positions(image_bound[b], T)
            # A mismatch could still broadcast (Q = 1) into the wrong number of slots: never scatter partially.
            assert pos.numel() == n * Q, f"sample {b}: image_bound covers {pos.numel()} slots, {n} packages x {Q}"
            out[b, pos.to(out.device)] = feats
        return out

    # ---- training / generation forward -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values=None,
                temporal_ids=None, image_bound=None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None,
                segment_ids: torch.Tensor | None = None) -> ModelOutput:
        """labels are aligned with input_ids (label[t] is the token at t); position t predicts label[t + 1].
        segment_ids [B, T] (packed rows, see llm.segment_mask): 0 = padding, k = k-th sample of the row."""
        embeds = self.embed(input_ids, pixel_values, temporal_ids, image_bound)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                cache=cache, segment_ids=segment_ids)  # [B, T, D]
        if labels is None:
            return ModelOutput(logits=self.llm.lm_head(hidden), loss=None)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # [B, T-1]
        n = int(keep.sum())
        if n == 0:  # keep the graph connected so DDP and accumulation still see every parameter
            return ModelOutput(logits=None, loss=hidden.sum() * 0.0, num_label_tokens=0)
        logits = self.llm.lm_head(hidden[:, :-1][keep]).float()  # [n, V]
        return ModelOutput(logits=None, loss=F.cross_entropy(logits, targets[keep]), num_label_tokens=n)

    # ---- generation: what the inference engine calls -----------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KVCache on this model's device and dtype."""
        return self.llm.new_cache(batch_size, max_len)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Left-padded embeddings [B, T, D] (from `embed`) and their mask [B, T] into an empty cache -> next-token
        logits [B, V]. Only the last position goes through the LM head (151k wide in the release)."""
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache)  # [B, T, D]
        return self.llm.lm_head(hidden[:, -1])

    def decode_step(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per cache row, token_ids [B] -> next-token logits [B, V]; the cache grows by one position."""
        return self.llm.lm_head(self.llm.model(input_ids=token_ids[:, None], cache=cache)[:, -1])


def _bound_positions(bounds, T: int) -> torch.Tensor:
    """[n, 2] half-open spans -> the positions they cover, in order."""
    bounds = torch.as_tensor(bounds, dtype=torch.long).reshape(-1, 2)
    if len(bounds) == 0:
        return torch.empty(0, dtype=torch.long)
    # Sorted, disjoint spans inside [0, T): a negative position would index from the end, an overlap write twice.
    flat = bounds.flatten()  # [s0, e0, s1, e1, ...] is non-decreasing exactly when the spans are
    assert flat[0] >= 0 and flat[-1] <= T and bool((flat.diff() >= 0).all()), f"image_bound {bounds.tolist()}, T={T}"
    return torch.cat([torch.arange(s, e) for s, e in bounds.tolist()])
