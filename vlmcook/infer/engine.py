"""Generation engine: token ids in, token ids out (no chat formatting; that is `api.py`).

Notable:
- One prefill forward for the whole batch: text + visual embeddings merged by `MiniCPMV.embed`, left padding, the
  KV cache remembers which positions are padding, so decode steps need no mask and positions stay per-request
  (`cumsum(mask) - 1`). Only the last position goes through `lm_head` (the released vocab is 151k wide).
- Finished rows are dropped from the cache with `KVCache.select` instead of being masked: decode compute then
  scales with the rows still running, and the one copy of the cache a drop costs is paid at most once per request.
- Each request samples with its own `torch.Generator` (seeded from `seed`, or from the global RNG when None), so a
  request gives the same tokens alone or in any batch. Logits are processed in HF's order: repetition penalty ->
  temperature -> top-k -> top-p; temperature 0 is greedy (argmax after the penalty, as HF's greedy search).
- Repetition penalty is HF's (`RepetitionPenaltyLogitsProcessor`: each seen id once, negative logits multiplied,
  positive divided) over the *generated* ids only: the release calls `generate(inputs_embeds=...)`, where HF's
  `input_ids` start empty, so the prompt (and its thousands of `<unk>` visual slots) is never penalised.
- Thinking budget: with `think_budget` set, the prompt is taken to end inside an open think block; after that many
  generated tokens without `</think>` the engine emits `think_end_ids` ("\\n</think>\\n\\n") itself, one per step
  (so batching is unaffected), then lets the model answer. Forced tokens count towards `max_new_tokens`.
- A request stops on its stop ids (default: the tokenizer's `<|im_end|>`, `<|endoftext|>`; the stop token is not
  part of `token_ids`), at `max_new_tokens`, or at the model's context length (finish_reason "length").
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None: drawn from torch's global RNG
    stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's stop ids; () = never stop on a token
    think_budget: int | None = None  # None: no budget (and no think tracking)
    think_end_ids: tuple[int, ...] | None = None  # None: the tokenizer's ids of "\n</think>\n\n"

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"SamplingParams.{name} = {getattr(self, name)!r}: {want}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an int >= 1")
        if not _is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an int >= 0 (0 = off)")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an int or None")
        if self.think_budget is not None and (not _is_int(self.think_budget) or self.think_budget < 0):
            bad("think_budget", "must be an int >= 0 or None")
        for name in ("stop_ids", "think_end_ids"):
            ids = getattr(self, name)
            if ids is None:
                continue
            ids = tuple(ids) if isinstance(ids, (list, tuple, set, frozenset, range)) else None
            if ids is None or not all(_is_int(i) and i >= 0 for i in ids):
                bad(name, "must be a list/tuple of token ids (ints >= 0) or None")
            object.__setattr__(self, name, ids)  # frozen: normalise lists to tuples once
        if self.think_end_ids == ():
            bad("think_end_ids", "must not be empty")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Generation:
    """The result of one request (one batch row)."""

    token_ids: list[int]  # generated ids, forced think-closing ids included, the stop token excluded
    finish_reason: str  # "stop" | "length"
    stop_id: int | None  # the stop token that ended it
    prompt_tokens: int  # real (unpadded) prompt tokens, visual slots included
    visual_tokens: int  # <unk> slots filled by the resampler
    prefill_s: float  # the batch's prefill forward (= time to first token)
    decode_s: float  # from the end of prefill until this row finished
    forced_think_end: bool = False  # the engine closed the think block (budget reached)
    vision_s: float = 0.0  # part of prefill_s: vision tower + resampler + merge (the batch's `embed`)

    @property
    def completion_tokens(self) -> int:
        """Tokens the request produced, its stop token included (what HF and OpenAI count)."""
        return len(self.token_ids) + (self.stop_id is not None)


@dataclass(frozen=True)
class Event:
    """A stream event: `token_id` is a new token of batch row `row`; the row's last event has `generation` set
    (and `token_id` None)."""

    row: int
    token_id: int | None
    forced: bool = False  # emitted by the engine (think budget), not sampled
    generation: Generation | None = None


@dataclass
class _Row:
    """Decoding state of one request."""

    params: SamplingParams
    stop: frozenset[int]
    limit: int  # max tokens to generate (max_new_tokens, cut by the context length)
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)  # think-closing ids still to emit
    thinking: bool = False  # inside a budgeted think block
    forced_think_end: bool = False


class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.think_end_id = tokenizer.think_end_id
        self.default_think_end = tuple(tokenizer.encode("\n</think>\n\n"))

    @property
    def context_length(self) -> int:
        return self.model.config.llm.max_position_embeddings

    def generate(self, batch: dict, params: SamplingParams | Sequence[SamplingParams]) -> list[Generation]:
        """Run a left-padded batch (`processor.collate(..., padding_side="left")`) to completion."""
        out = [None] * batch["input_ids"].shape[0]
        for ev in self.stream(batch, params):
            if ev.generation is not None:
                out[ev.row] = ev.generation
        return out

    @torch.inference_mode()
    def stream(self, batch: dict, params: SamplingParams | Sequence[SamplingParams]) -> Iterator[Event]:
        """Yield an `Event` per generated token as it is produced, and a final one per row with its Generation."""
        ids, mask = self._check_batch(batch)
        B, T = ids.shape
        params = [params] * B if isinstance(params, SamplingParams) else list(params)
        if len(params) != B or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"Engine: got {len(params)} params for a batch of {B} rows; give one SamplingParams "
                             f"or a list of one per row")
        prompt_lens = mask.sum(1).tolist()
        rows = [self._new_row(p, n, b) for b, (p, n) in enumerate(zip(params, prompt_lens))]
        visual = [int((bd[:, 1] - bd[:, 0]).sum()) if len(bd) else 0
                  for bd in (torch.as_tensor(x).reshape(-1, 2) for x in batch.get("image_bound") or [[]] * B)]
        llm = self.model.llm
        t0 = time.perf_counter()
        cache = llm.new_cache(B, T + max(r.limit for r in rows))
        embeds = self._embed(ids, batch)  # [B, T, D]
        t_vision = time.perf_counter() - t0
        logits = llm.lm_head(llm.model(inputs_embeds=embeds, attention_mask=mask, cache=cache)[:, -1])  # [B, V]
        t1 = time.perf_counter()
        active = list(range(B))  # batch row of each cache row
        while active:
            next_ids, keep = [], []
            for i, b in enumerate(active):
                r = rows[b]
                tok, forced = self._next_token(r, logits[i])
                if tok in r.stop and not forced:
                    yield Event(b, None, generation=self._done(r, "stop", tok, prompt_lens[b], visual[b], t1 - t0,
                                                               t1, t_vision))
                    continue
                r.tokens.append(tok)
                yield Event(b, tok, forced=forced)
                if len(r.tokens) >= r.limit:
                    yield Event(b, None, generation=self._done(r, "length", None, prompt_lens[b], visual[b],
                                                               t1 - t0, t1, t_vision))
                    continue
                next_ids.append(tok)
                keep.append(i)
            if not keep:
                break
            if len(keep) < len(active):
                cache.select(keep)
                active = [active[i] for i in keep]
            step = torch.tensor(next_ids, dtype=torch.long, device=ids.device)[:, None]  # [b, 1]
            logits = llm.lm_head(llm.model(input_ids=step, cache=cache)[:, -1])

    def _embed(self, ids: torch.Tensor, batch: dict) -> torch.Tensor:
        """Merged text + visual embeddings [B, T, D] (rows without visuals keep their text embeddings)."""
        return self.model.embed(ids, batch.get("pixel_values"), batch.get("temporal_ids"), batch.get("image_bound"))

    # ---- per-request state --------------------------------------------------------------------------------------
    def _new_row(self, p: SamplingParams, prompt_len: int, b: int) -> _Row:
        ctx = self.context_length
        if prompt_len >= ctx:
            raise ValueError(f"row {b}: the prompt is {prompt_len} tokens, the model's context is {ctx} "
                             f"(max_position_embeddings); no room to generate")
        gen = None
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()))
            gen = torch.Generator(device=self.model.llm.lm_head.weight.device).manual_seed(seed)
        stop = frozenset(self.tokenizer.stop_ids if p.stop_ids is None else p.stop_ids)
        return _Row(p, stop, min(p.max_new_tokens, ctx - prompt_len), gen, thinking=p.think_budget is not None)

    def _next_token(self, r: _Row, logits: torch.Tensor) -> tuple[int, bool]:
        """Sample (or force) the next token of one request; track its think block."""
        p = r.params
        if r.thinking and not r.forced and len(r.tokens) >= p.think_budget:
            r.forced = list(p.think_end_ids or self.default_think_end)
            r.thinking, r.forced_think_end = False, True
        if r.forced:
            return r.forced.pop(0), True
        tok = sample(logits, p, r.tokens, r.generator)
        if tok == self.think_end_id:
            r.thinking = False
        return tok, False

    @staticmethod
    def _done(r: _Row, reason: str, stop_id, prompt_len: int, visual: int, prefill_s: float, t1: float,
              vision_s: float) -> Generation:
        return Generation(list(r.tokens), reason, stop_id, prompt_len, visual, prefill_s, time.perf_counter() - t1,
                          r.forced_think_end, vision_s)

    def _check_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids [B, T], attention_mask [B, T]; every row must be left-padded (real tokens at the end)."""
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("Engine: batch must be a dict from processor.collate(..., padding_side='left')")
        device = self.model.llm.lm_head.weight.device
        ids = batch["input_ids"].to(device)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"Engine: input_ids has shape {tuple(ids.shape)}, expected [B, T] with T >= 1")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device).long()
        if mask.shape != ids.shape:
            raise ValueError(f"Engine: attention_mask {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
        # Left padding <=> the mask never goes 1 -> 0 along a row, and the last position is real.
        bad = ((mask[:, 1:] < mask[:, :-1]).any(1) | (mask[:, -1] == 0)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"Engine: rows {bad} are not left-padded (or are empty); build the batch with "
                             f"collate(..., padding_side='left')")
        vocab = self.model.config.llm.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"Engine: input_ids outside the model's vocabulary [0, {vocab})")
        return ids, mask


# ---- sampling (pure functions) -----------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """HF's rule on logits [V]: for each distinct seen id, logit < 0 -> logit * penalty, else logit / penalty."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    picked = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """HF's TopK then TopP warpers on logits [V] (removed entries -> -inf; the most likely token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[-1] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, seen: Sequence[int], generator: torch.Generator | None) -> int:
    """One token id from logits [V] under params p, given the ids generated so far."""
    logits = apply_repetition_penalty(logits.float(), seen, p.repetition_penalty)
    if p.temperature == 0:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
