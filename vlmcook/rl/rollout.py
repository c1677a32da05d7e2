"""Rollouts: G samples per prompt from the current policy with the inference engine, all in the prompt's mode; and
the teacher-forced log-probs of given continuations (the policy side of GRPO and RLPR's probability reward).

Notable:
- A task is a prompt (messages, images/videos inline as everywhere else), a reference answer and the name of the
  verifier that checks it (rewards.VERIFIERS). The mode is drawn per prompt: long (`<think>\\n` prefilled by the
  template) with probability `long_share`, else short (the template's empty think block). All G samples of a prompt
  share its mode, so a group compares like with like.
- Sampling seeds are a pure function of (seed, step, prompt, sample): a resumed run redraws the same rollouts.
- A completion's training tokens are what the policy sampled: the generated ids plus the stop token when it stopped
  (learning to stop is part of the policy); a truncated one (finish "length") has no stop token.
- `continuation_logprobs` runs one right-padded forward over prompt + continuation and applies the LM head only at
  the continuation's positions ([n, V] instead of [B, T, V]: the released vocab is 151k wide).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vlmcook.data.processor import collate
from vlmcook.infer.engine import Engine, SamplingParams
from vlmcook.rl.grpo import token_logprobs


@dataclass
class Task:
    """One RL prompt. verifier: number | choice | string | anls | prob (RLPR) | none (unverifiable)."""

    id: str
    messages: list[dict]
    answer: str | list[str]
    verifier: str = "number"
    tolerance: float = 0.0  # absolute tolerance of the number verifier
    images: list | None = None  # for `(<image>./</image>)` markers in the messages (processor's `images=`)


@dataclass
class Completion:
    token_ids: list[int]  # sampled ids, + the stop id when the sample stopped
    text: str  # decoded generated text (no stop token)
    truncated: bool  # hit max_new_tokens / the context length


@dataclass
class Group:
    task: Task
    long: bool  # mode of the prompt (and of every sample in the group)
    prompt: dict  # processor output of the prompt in that mode (one row)
    completions: list[Completion] = field(default_factory=list)
    key: str = ""  # the prompt's global slot ("step:k"): seeds do not depend on how prompts are split over ranks


def draw_modes(keys: list[str], long_share: float, seed: int) -> list[bool]:
    """Per-prompt coin: True (long) with probability long_share; a pure function of (seed, key)."""
    if not 0.0 <= long_share <= 1.0:
        raise ValueError(f"long_share must lie in [0, 1], got {long_share}")
    return [random.Random(f"rl-mode:{seed}:{k}").random() < long_share for k in keys]


def sample_seed(seed: int, step: int, prompt: int | str, sample: int) -> int:
    return random.Random(f"rl-sample:{seed}:{step}:{prompt}:{sample}").getrandbits(62)


def make_groups(tasks: list[Task], modes: list[bool], processor, keys: list[str] | None = None) -> list[Group]:
    keys = keys or [""] * len(tasks)
    return [Group(t, m, processor(t.messages, t.images, thinking=m), key=k) for t, m, k in zip(tasks, modes, keys)]


@torch.no_grad()
def rollout(engine: Engine, groups: list[Group], G: int, max_new_tokens: int, temperature: float = 1.0,
            top_p: float = 1.0, seed: int = 0, step: int = 0, rows_per_call: int = 64) -> list[Group]:
    """Fill each group with G completions (in place; also returned). Each prompt is prefilled once (vision
    included) and its G samples decoded from copies of its KV rows; rows_per_call // G prompts per engine call."""
    tok = engine.tokenizer
    per_call = max(1, rows_per_call // G)
    for k in range(0, len(groups), per_call):
        chunk = range(k, min(k + per_call, len(groups)))
        batch = collate([groups[i].prompt for i in chunk], tok.pad_id, padding_side="left")
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=sample_seed(seed, step, groups[i].key or i, g)) for i in chunk for g in range(G)]
        gens = engine.generate(batch, params, num_samples=G)  # row i * G + g: sample g of prompt chunk[i]
        for j, gen in enumerate(gens):
            ids = list(gen.token_ids) + ([gen.stop_id] if gen.stop_id is not None else [])
            groups[chunk[j // G]].completions.append(Completion(ids, tok.decode(gen.token_ids),
                                                                gen.finish_reason == "length"))
    return groups


class ContinuationScorer(nn.Module):
    """forward(prompts, continuations) -> (logp [B, L], mask [B, L]): log pi(c_j | prompt, c_<j) per token.

    A module (not a function) so DistributedDataParallel can wrap it: DDP only syncs gradients of forward calls."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, prompts: list[dict], continuations: list[list[int]], pad_id: int = 0):
        if len(prompts) != len(continuations) or not prompts:
            raise ValueError(f"ContinuationScorer: {len(prompts)} prompts for {len(continuations)} continuations")
        if any(len(c) == 0 for c in continuations):
            raise ValueError("ContinuationScorer: empty continuation (nothing to score)")
        rows = [_join(p, c) for p, c in zip(prompts, continuations)]
        batch = collate(rows, pad_id, padding_side="right")
        dev = self.model.llm.lm_head.weight.device
        ids = batch["input_ids"].to(dev)
        embeds = _embed(self.model, ids, batch)
        hidden = self.model.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(dev))
        B, L = len(rows), max(len(c) for c in continuations)
        pos = torch.zeros(B, L, dtype=torch.long)
        tgt = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for b, (p, c) in enumerate(zip(prompts, continuations)):
            start = p["input_ids"].shape[1]
            pos[b, :len(c)] = torch.arange(start - 1, start - 1 + len(c))  # position t predicts token t + 1
            tgt[b, :len(c)] = torch.tensor(c)
            mask[b, :len(c)] = True
        pos, tgt, mask = pos.to(dev), tgt.to(dev), mask.to(dev)
        h = hidden[torch.arange(B, device=dev)[:, None], pos]  # [B, L, D]
        logits = self.model.llm.lm_head(h[mask])  # [n, V]: the head only where there is a target
        logp = torch.zeros(B, L, device=dev)
        logp[mask] = token_logprobs(logits, tgt[mask])
        return logp, mask


def _embed(model: nn.Module, ids: torch.Tensor, batch: dict) -> torch.Tensor:
    """Merged embeddings [B, T, D]; rows with visuals and text-only rows are embedded apart (as the engine does)."""
    pv, tids, bounds = batch["pixel_values"], batch["temporal_ids"], batch["image_bound"]
    rows = [b for b in range(ids.shape[0]) if len(tids[b])]
    if not rows:
        return model.embed(ids)
    if len(rows) == ids.shape[0]:
        return model.embed(ids, pv, tids, bounds)
    embeds = model.embed(ids)
    embeds[rows] = model.embed(ids[rows], [pv[b] for b in rows], [tids[b] for b in rows], [bounds[b] for b in rows])
    return embeds


def _join(prompt: dict, cont: list[int]) -> dict:
    """A processor row extended by continuation ids (visual slots unchanged: they sit inside the prompt)."""
    ids = torch.cat([prompt["input_ids"], torch.tensor([cont], dtype=torch.long)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": prompt["pixel_values"],
            "temporal_ids": prompt["temporal_ids"], "image_bound": prompt["image_bound"]}
