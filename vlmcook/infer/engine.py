"""Generation engine: token ids in, token ids out, for every caller in the process at once (chat formatting: api.py).

Notable:
- Iteration-level scheduling, the loop in `Engine.step`: prefill the prompts that arrived since (together, images and
  videos included; n samples of a prompt share one prefill, its KV row repeated) and emit their first tokens, then
  decode one token for every running row (one sampling call each), drop finished and cancelled rows at once. A
  background thread runs steps while there is work; `stream` / `generate` from any thread join the same batch.
- Bounded (`Limits`, defaults from the model and the free memory; docs/reliability.md): running rows, waiting
  submissions (`QueueFullError`) and KV positions; what can never fit is refused up front (`WontFitError`).
- The KV cache is padded: rows are right-aligned and share the write position, so each row costs the whole window
  (oldest running prompt start .. furthest position any row may still reach), reserved when it joins, and a join
  copies the cache once. Paging (per-row blocks) would pay when lengths differ widely (a long video among short
  chats) or when joins are frequent at long contexts; at the sizes we run, it is not needed for the targets.
- Every sampled row draws one uniform per token from its own generator (`seed`, or torch's global RNG when None)
  and the batched sampler never mixes rows, so a request yields the same tokens alone or in any batch. Logits follow
  HF's order: repetition penalty (generated ids only, as the release's `generate(inputs_embeds=...)`) ->
  temperature -> top-k -> top-p; temperature 0 is greedy (argmax after the penalty).
- Thinking budget: after `think_budget` tokens without `</think>` the engine emits `think_end_ids` itself, one per
  step (they count towards `max_new_tokens`). A row stops on its stop ids (not part of `token_ids`), at
  `max_new_tokens` or at the context length (finish_reason "length").
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from vlmcook.data.processor import collate

# Positive temperatures below MIN_TEMPERATURE are refused (0 is greedy); penalties outside PENALTY_RANGE too: within
# them every step stays finite in float32 for logits up to ~1e35 (temperature divides logits minus their maximum).
MIN_TEMPERATURE, PENALTY_RANGE = 1e-4, (1e-3, 1e3)
MAX_ROWS = 64  # default ceiling of running rows: past it a decode step is compute-bound and only slows every stream


DEFAULT_MAX_NEW_TOKENS = 2048  # the release's chat() default; ChatModel cuts it to the context left


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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
        if not _is_num(self.temperature) or not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):
            bad("temperature", f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an int >= 0 (0 = off)")
        if not _is_num(self.repetition_penalty) or not PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1]:
            bad("repetition_penalty", f"must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}] (1 = off)")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            bad("seed", "must be an int in [0, 2^63) or None")
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


@dataclass(frozen=True)
class Limits:
    """What the scheduler admits (docs/reliability.md). `default_limits` derives them from the model and memory."""

    max_rows: int  # rows decoding together; a prompt with n samples takes n
    max_queue: int  # submissions waiting to join the running rows, a new one included; more: QueueFullError
    max_kv_tokens: int  # KV-cache positions allocated (rows x padded window); a prompt that can never fit: WontFitError

    def __post_init__(self):
        for name in ("max_rows", "max_queue", "max_kv_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} = {getattr(self, name)!r}: must be an int >= 1")


class QueueFullError(RuntimeError):
    """`max_queue` submissions are waiting already: retry shortly (HTTP 429)."""


class WontFitError(ValueError):
    """A submission larger than the engine's limits could ever admit (HTTP 400)."""


def kv_bytes_per_token(cache) -> int:
    """Bytes one position of one row takes in a KVCache: keys and values of every layer, plus its mask entry."""
    return sum(t[0, :, 0].numel() * t.element_size() for t in (*cache.k, *cache.v)) + cache.mask.element_size()


def default_limits(bytes_per_token: int, context: int, device: torch.device) -> Limits:
    """KV positions: half the memory free now (at most MAX_ROWS full contexts); rows: one per 1024 of those positions
    (at most MAX_ROWS); as many submissions may wait as rows run."""
    kv = max(1, min(MAX_ROWS * context, _free_bytes(device) // 2 // bytes_per_token))
    rows = max(1, min(MAX_ROWS, kv // 1024))
    return Limits(max_rows=rows, max_queue=rows, max_kv_tokens=kv)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # host memory (CPU, and the unified memory of other backends); MemAvailable counts reclaimable cache
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass
class Generation:
    """The result of one row (one sample of one request)."""

    token_ids: list[int]  # generated ids, forced think-closing ids included, the stop token excluded
    finish_reason: str  # "stop" | "length"
    stop_id: int | None  # the stop token that ended it
    prompt_tokens: int  # real (unpadded) prompt tokens, visual slots included
    visual_tokens: int  # <unk> slots filled by the resampler
    prefill_s: float  # the prefill step that admitted it (vision, LLM, joining the cache) = time to first token
    decode_s: float  # from the end of prefill until this row finished
    forced_think_end: bool = False  # the engine closed the think block (budget reached)
    vision_s: float = 0.0  # part of prefill_s: vision tower + resampler + merge (the step's `embed`)

    @property
    def completion_tokens(self) -> int:
        """Tokens the request produced, its stop token included (what HF and OpenAI count)."""
        return len(self.token_ids) + (self.stop_id is not None)


@dataclass(frozen=True)
class Event:
    """A stream event: `token_id` is a new token of row `row` (batch row b, sample s: b * num_samples + s); the
    row's last event has `generation` set (and `token_id` None)."""

    row: int
    token_id: int | None
    forced: bool = False  # emitted by the engine (think budget), not sampled
    generation: Generation | None = None


class _Submission:
    """One caller's rows: the loop thread puts their Events (or the exception that ended them) in `events`; the
    caller sets `cancelled` when it stops reading."""

    def __init__(self, rows: int):
        self.rows, self.events, self.cancelled = rows, queue.SimpleQueue(), threading.Event()


@dataclass
class _Row:
    """Decoding state of one sequence."""

    sub: _Submission
    index: int  # Event.row
    params: SamplingParams
    stop: frozenset[int]
    limit: int  # max tokens to generate (max_new_tokens, cut by the context length)
    generator: torch.Generator | None
    prompt_tokens: int
    visual_tokens: int
    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)  # think-closing ids still to emit
    thinking: bool = False  # inside a budgeted think block
    forced_think_end: bool = False
    prefill_s: float = 0.0
    vision_s: float = 0.0
    decode_t0: float = 0.0  # when its prefill ended


@dataclass
class _Group:
    """A prompt waiting to join: one unpadded processor row ([1, T]) and the rows of its samples."""

    sample: dict
    rows: list[_Row]


class Engine:
    def __init__(self, model, tokenizer, limits: Limits | None = None):
        """model: `embed`, `new_cache`, `prefill`, `decode_step` and `config` (MiniCPMV's generation interface)."""
        self.model, self.tokenizer = model, tokenizer
        self.think_end_id = tokenizer.think_end_id
        self.default_think_end = tuple(tokenizer.encode("\n</think>\n\n"))
        probe = model.new_cache(1, 1)
        self.device, self.kv_bytes_per_token = probe.mask.device, kv_bytes_per_token(probe)
        self.limits = limits or default_limits(self.kv_bytes_per_token, self.context_length, self.device)
        self.cancelled = 0  # submissions dropped because their caller stopped reading
        self._lock = threading.Lock()  # guards _queue and _thread (callers' threads and the loop thread)
        self._queue: deque[_Group] = deque()
        self._thread: threading.Thread | None = None
        # The loop thread's own state: running row i is cache row i; `_joining` = rows being admitted this step.
        self._rows: list[_Row] = []
        self._joining: list[_Row] = []
        self._cache = None

    @property
    def context_length(self) -> int:
        return self.model.config.llm.max_position_embeddings

    def load(self) -> dict:
        """Rows running and submissions waiting, now (any thread)."""
        with self._lock:
            waiting = len({id(g.rows[0].sub) for g in self._queue})
        return {"running_rows": len(self._rows), "waiting": waiting}

    # ---- the caller's side ----------------------------------------------------------------------------------------
    def generate(self, batch: dict, params: SamplingParams | Sequence[SamplingParams],
                 num_samples: int = 1) -> list[Generation]:
        """Run a left-padded batch (`processor.collate(..., padding_side="left")`) to completion; one Generation
        per row (b * num_samples + s)."""
        out = {}
        for ev in self.stream(batch, params, num_samples):
            if ev.generation is not None:
                out[ev.row] = ev.generation
        return [out[i] for i in range(len(out))]

    def stream(self, batch: dict, params: SamplingParams | Sequence[SamplingParams],
               num_samples: int = 1) -> Iterator[Event]:
        """Yield an `Event` per generated token as it is produced and a final one per row with its Generation.
        params: one for all rows, one per batch row (a seeded one gives sample s the seed + s) or one per row.
        Closing the iterator (the caller is gone) drops the rows at the next step."""
        sub = self._submit(batch, params, num_samples)
        left = sub.rows
        try:
            while left:
                ev = sub.events.get()
                if isinstance(ev, WontFitError):  # the limits were lowered while it waited
                    raise ev
                if isinstance(ev, BaseException):
                    raise RuntimeError(f"generation failed: {type(ev).__name__}: {ev}") from ev
                left -= ev.generation is not None
                yield ev
        finally:
            sub.cancelled.set()

    def _submit(self, batch: dict, params, num_samples: int) -> _Submission:
        """Validate, check the limits, queue the prompts, wake the loop. Errors are raised here, in the caller."""
        ids, mask = self._check_batch(batch)
        B, n = ids.shape[0], num_samples
        if not _is_int(n) or n < 1:
            raise ValueError(f"Engine: num_samples = {n!r}: must be an int >= 1")
        if n > self.limits.max_rows:
            raise WontFitError(f"{n} samples of one prompt need {n} rows at once; this engine runs at most "
                               f"{self.limits.max_rows} (max_rows)")
        params = self._params(params, B, n)
        sub = _Submission(B * n)
        groups = []
        for b, sample in enumerate(_split(batch, ids, mask)):
            T = sample["input_ids"].shape[1]
            visual = int((sample["image_bound"][0][:, 1] - sample["image_bound"][0][:, 0]).sum())
            rows = [self._new_row(sub, b * n + s, params[b * n + s], T, visual, b) for s in range(n)]
            need = n * (T + max(r.limit for r in rows) - 1)
            if need > self.limits.max_kv_tokens:
                raise WontFitError(f"row {b}: {n} x ({T} prompt + {need // n - T + 1} new tokens - 1) = {need} "
                                   f"KV-cache positions, more than this engine holds ({self.limits.max_kv_tokens}, "
                                   f"max_kv_tokens); ask for fewer new tokens or samples, or shorten the prompt")
            groups.append(_Group(sample, rows))
        with self._lock:
            waiting = len({id(g.rows[0].sub) for g in self._queue})
            if waiting >= self.limits.max_queue:
                raise QueueFullError(f"{waiting} requests are waiting already (max_queue {self.limits.max_queue})")
            self._queue.extend(groups)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="vlmcook-engine")  # ends when idle
                self._thread.start()
        return sub

    def _params(self, params, B: int, n: int) -> list[SamplingParams]:
        params = [params] * B if isinstance(params, SamplingParams) else list(params)
        if n > 1 and len(params) == B:  # per prompt: its samples need distinct seeds
            params = [p if p.seed is None else replace(p, seed=p.seed + s) for p in params for s in range(n)]
        if len(params) != B * n or not all(isinstance(p, SamplingParams) for p in params):
            per_row = f" or per sample ({B} x {n})" if n > 1 else ""
            raise ValueError(f"Engine: got {len(params)} params for a batch of {B} rows; give one SamplingParams "
                             f"or a list of one per row{per_row}")
        return params

    def _new_row(self, sub: _Submission, index: int, p: SamplingParams, prompt_len: int, visual: int,
                 b: int) -> _Row:
        ctx = self.context_length
        if prompt_len >= ctx:
            raise ValueError(f"row {b}: the prompt is {prompt_len} tokens, the model's context is {ctx} "
                             f"(max_position_embeddings); no room to generate")
        gen = None
        if p.temperature > 0:  # a CPU generator on any device: it draws one number per token
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()))
            gen = torch.Generator().manual_seed(seed)
        stop = frozenset(self.tokenizer.stop_ids if p.stop_ids is None else p.stop_ids)
        return _Row(sub, index, p, stop, min(p.max_new_tokens, ctx - prompt_len), gen, prompt_len, visual,
                    thinking=p.think_budget is not None)

    def _check_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids [B, T], attention_mask [B, T]; rows left-padded, ids in the vocabulary, visual slots
        matching the packages (a bad row must fail here, not inside a step shared with other callers)."""
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("Engine: batch must be a dict from processor.collate(..., padding_side='left')")
        ids = batch["input_ids"].to(self.device)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"Engine: input_ids has shape {tuple(ids.shape)}, expected [B, T] with T >= 1")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(self.device).long()
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
        B, T, Q = *ids.shape, self.model.config.query_num
        views, packages, bounds = (batch.get(k) or [[]] * B for k in ("pixel_values", "temporal_ids", "image_bound"))
        pads = (mask == 0).sum(1).tolist()
        for b in range(B):
            flat = torch.as_tensor(bounds[b], dtype=torch.long).flatten()  # [s0, e0, s1, e1, ...]
            slots = int((flat[1::2] - flat[0::2]).sum())
            inside = len(flat) == 0 or (flat[0] >= pads[b] and flat[-1] <= T and bool((flat.diff() >= 0).all()))
            if not inside or slots != len(packages[b]) * Q or sum(map(len, packages[b])) != len(views[b]):
                raise ValueError(f"Engine: row {b}: image_bound {flat.reshape(-1, 2).tolist()} must be ordered spans "
                                 f"inside the prompt covering {len(packages[b])} package(s) x {Q} slots, and the "
                                 f"packages must cover its {len(views[b])} view(s)")
        return ids, mask

    # ---- the loop ----------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    if not self._queue and not self._rows:
                        self._thread = None
                        return
                try:
                    self.step()
                except Exception as e:  # out of memory, a bug: the rows in flight get it, the engine goes on
                    for r in (*self._rows, *self._joining):
                        r.sub.events.put(e)
                    self._rows, self._joining, self._cache = [], [], None

    def step(self) -> None:
        """One iteration: drop cancelled rows; prefill the arrivals that fit and emit their first tokens; decode one
        token for every running row and emit it; finished rows leave, the arrivals join the cache."""
        self._keep([i for i, r in enumerate(self._rows) if not r.sub.cancelled.is_set()], cancelled=True)
        groups, cache = self._admit(), None
        if groups:  # first, so that waiting for a token is never longer than one prefill behind the running rows
            self._joining = [r for g in groups for r in g.rows]
            logits, cache = self._prefill(groups)
            kept = self._advance(self._joining, logits)
            self._joining, cache = [self._joining[i] for i in kept], cache.select(kept)
        if self._rows:  # each running row feeds the token it emitted last
            last = torch.tensor([r.tokens[-1] for r in self._rows], device=self.device)
            self._keep(self._advance(self._rows, self.model.decode_step(last, self._cache)))
        if self._joining:
            room = max(r.limit - len(r.tokens) for r in (*self._rows, *self._joining))  # positions still to come
            self._cache = join_caches(self._cache, cache, room)
            self._rows, self._joining = self._rows + self._joining, []

    def _admit(self) -> list[_Group]:
        """Waiting prompts, first come first served, while the rows and the padded KV window they need fit."""
        lim, rows = self.limits, len(self._rows)
        live = self._live() + bool(self._rows)  # positions in use once this step's decode has written its token
        room = max((r.limit - len(r.tokens) - 1 for r in self._rows), default=0)  # positions still to come
        out = []
        with self._lock:
            while self._queue:
                g = self._queue[0]
                if g.rows[0].sub.cancelled.is_set():
                    self._queue.popleft()
                    self.cancelled += 1
                    continue
                n, T = len(g.rows), g.sample["input_ids"].shape[1]
                rows2, live2, room2 = rows + n, max(live, T), max(room, max(r.limit for r in g.rows) - 1)
                if rows2 > lim.max_rows or rows2 * (live2 + room2) > lim.max_kv_tokens:
                    if rows == 0:  # it does not fit alone either: the limits were lowered after it was queued
                        error = WontFitError(f"over the engine's limits, lowered since it was queued: {lim}")
                        self._queue.popleft().rows[0].sub.events.put(error)
                        continue
                    break
                out.append(self._queue.popleft())
                rows, live, room = rows2, live2, room2
        return out

    def _live(self) -> int:
        """Cache positions from the first one a running row still uses to the write position."""
        if self._cache is None:
            return 0
        used = self._cache.mask[:, :self._cache.length].any(0)
        return self._cache.length - int(used.int().argmax())

    def _prefill(self, groups: list[_Group]):
        """The arrivals' prompts in one left-padded forward (vision included) -> next-token logits [rows, V] and
        their own KVCache, both with each prompt's row repeated for its samples."""
        t0 = time.perf_counter()
        batch = collate([g.sample for g in groups], self.tokenizer.pad_id, "left")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        embeds = self.model.embed(ids, batch["pixel_values"], batch["temporal_ids"], batch["image_bound"])
        t_vision = time.perf_counter() - t0
        cache = self.model.new_cache(len(groups), ids.shape[1])
        logits = self.model.prefill(embeds, mask, cache)  # [G, V]
        repeat = torch.tensor([i for i, g in enumerate(groups) for _ in g.rows], device=self.device)
        t1 = time.perf_counter()
        for r in self._joining:
            r.prefill_s, r.vision_s, r.decode_t0 = t1 - t0, t_vision, t1
        return logits[repeat], cache.select(repeat)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """The next token of each row (forced, or sampled in one call) and its events -> the rows still running."""
        forced = [self._forced(r) for r in rows]
        todo = [i for i, f in enumerate(forced) if f is None]
        tokens = list(forced)
        if todo:
            picked = sample(logits if len(todo) == len(rows) else logits[todo], [rows[i].params for i in todo],
                            [rows[i].tokens for i in todo], [rows[i].generator for i in todo])
            for i, tok in zip(todo, picked):
                tokens[i] = tok
        keep = []
        for i, (r, tok) in enumerate(zip(rows, tokens)):
            sampled = forced[i] is None
            if sampled and tok == self.think_end_id:
                r.thinking = False
            if sampled and tok in r.stop:
                self._finish(r, "stop", tok)
                continue
            r.tokens.append(tok)
            r.sub.events.put(Event(r.index, tok, forced=not sampled))
            if len(r.tokens) >= r.limit:
                self._finish(r, "length", None)
                continue
            keep.append(i)
        return keep

    def _forced(self, r: _Row) -> int | None:
        """The think-closing token this row must emit now (its budget is spent), else None (sample)."""
        if r.thinking and not r.forced and len(r.tokens) >= r.params.think_budget:
            r.forced = list(r.params.think_end_ids or self.default_think_end)
            r.thinking, r.forced_think_end = False, True
        return r.forced.pop(0) if r.forced else None

    @staticmethod
    def _finish(r: _Row, reason: str, stop_id: int | None) -> None:
        g = Generation(list(r.tokens), reason, stop_id, r.prompt_tokens, r.visual_tokens, r.prefill_s,
                       time.perf_counter() - r.decode_t0, r.forced_think_end, r.vision_s)
        r.sub.events.put(Event(r.index, None, generation=g))

    def _keep(self, keep: list[int], cancelled: bool = False) -> None:
        """Keep only these running rows (and their cache rows), in this order."""
        if len(keep) == len(self._rows):
            return
        if cancelled:
            kept = set(keep)
            self.cancelled += len({id(r.sub) for i, r in enumerate(self._rows) if i not in kept})
        self._rows = [self._rows[i] for i in keep]
        self._cache = self._cache.select(keep) if keep else None


def _split(batch: dict, ids: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    """A left-padded batch -> one unpadded processor row ([1, T_b]) per prompt, its image_bound shifted back."""
    B = ids.shape[0]
    views, packages, bounds = (batch.get(k) or [[]] * B for k in ("pixel_values", "temporal_ids", "image_bound"))
    out = []
    for b, pad in enumerate((mask == 0).sum(1).tolist()):
        bound = torch.as_tensor(bounds[b], dtype=torch.long).reshape(-1, 2) - pad
        out.append({"input_ids": ids[b:b + 1, pad:], "attention_mask": mask[b:b + 1, pad:],
                    "pixel_values": [views[b]], "temporal_ids": [packages[b]], "image_bound": [bound]})
    return out


def join_caches(a, b, room: int):
    """The rows of KVCache `a` (or None) then those of `b`, right-aligned on the newest position, in `b`'s object:
    columns no row uses any more are trimmed from the left and `room` free ones added at the end. Built one layer at
    a time, freeing the old layers as it goes: the peak is the two caches plus one layer."""
    parts = [c for c in (a, b) if c is not None]
    spans = []  # (first column any row uses, length) of each part
    for c in parts:
        used = c.mask[:, :c.length].any(0)
        spans.append((int(used.int().argmax()), c.length))
    L = max(end - start for start, end in spans)
    rows = sum(c.batch_size for c in parts)

    def stack(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:  # dim: the position axis
        shape = list(tensors[0].shape)
        shape[0], shape[dim] = rows, L + room
        out, r = tensors[0].new_zeros(shape), 0  # zeros: padded keys must stay finite (0 x NaN is NaN)
        for t, (start, end) in zip(tensors, spans):
            out[r:r + t.shape[0]].narrow(dim, L - (end - start), end - start).copy_(t.narrow(dim, start, end - start))
            r += t.shape[0]
        return out

    mask = stack([c.mask for c in parts], 1)
    for i in range(len(b.k)):
        for name in ("k", "v"):
            layers = [getattr(c, name) for c in parts]
            new = stack([layer[i] for layer in layers], 2)
            for layer in layers:
                layer[i] = None
            getattr(b, name)[i] = new
    b.mask, b.max_len, b.length = mask, L + room, L
    return b


# ---- sampling: one call for a batch of rows, no row influencing another ----------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[Sequence[int]],
                             penalty: Sequence[float]) -> torch.Tensor:
    """HF's rule per row of logits [B, V]: each distinct id in seen[b]: logit < 0 -> logit * penalty[b], else
    logit / penalty[b] (out of place; only the seen columns are read and written)."""
    width = max(map(len, seen), default=0)
    if width == 0 or all(p == 1.0 for p in penalty):
        return logits
    # [B, width] ids, short rows padded with a repeat of an id (written twice, same value); empty rows: penalty 1
    idx = torch.tensor([[*s, *[s[0] if s else 0] * (width - len(s))] for s in seen], device=logits.device)
    pen = torch.tensor([p if s else 1.0 for p, s in zip(penalty, seen)], dtype=logits.dtype,
                       device=logits.device)[:, None]
    got = logits.gather(1, idx)
    return logits.scatter(1, idx, torch.where(got < 0, got * pen, got / pen))


def top_k_top_p(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
                temperature: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's Temperature, TopK then TopP warpers per row of logits x [B, V], as candidates: values [B, K] =
    (logit - max) / temperature, sorted descending, -inf where removed, and their ids [B, K]. K is the largest top-k
    (+1, to see whether a tie at the k-th value, which HF keeps, runs on), or V when a row has top-p alone."""
    B, V = x.shape
    k = torch.tensor([t if 0 < t < V else V for t in top_k], device=x.device)[:, None]
    K = int(k.max())
    vals, ids = x.topk(K + 1) if K < V else (None, None)
    if vals is None or bool(((vals[:, K:] == vals.gather(1, k - 1)) & (vals[:, K:] > -math.inf)).any()):
        vals, ids = x.sort(descending=True)
    temp = torch.tensor(temperature or [1.0] * B, dtype=x.dtype, device=x.device)[:, None]
    vals = (vals - vals[:, :1]) / temp  # <= 0, finite or -inf for any temperature > 0
    vals = vals.masked_fill(vals < vals.gather(1, k - 1), -math.inf)
    # HF drops a token when the ascending cumulative probability up to it is <= 1 - p, i.e. when the tokens above it
    # hold >= p of the mass (the top token always stays); unnormalised weights: no sum over the row.
    w = vals.exp().double()
    cum = w.cumsum(-1)
    p = torch.tensor(top_p, dtype=torch.float64, device=x.device)[:, None]
    return vals.masked_fill((cum - w >= p * cum[:, -1:]) & (p < 1), -math.inf), ids


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], seen: Sequence[Sequence[int]],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token id per row of logits [B, V]: row b under params[b], given its generated ids seen[b], drawing one
    uniform from generators[b] (None on greedy rows). Every operation is per row (maxima, sorts, prefix sums), so a
    row gets the same token alone or in any batch."""
    logits = apply_repetition_penalty(logits.float(), seen, [p.repetition_penalty for p in params])
    B, V = logits.shape
    hot = [b for b, p in enumerate(params) if p.temperature > 0]
    out = logits.argmax(-1) if len(hot) < B else torch.empty(B, dtype=torch.long, device=logits.device)
    if not hot:
        return out.tolist()
    u = torch.tensor([float(torch.rand((), generator=generators[b], dtype=torch.float64)) for b in hot],
                     dtype=torch.float64, device=logits.device)
    filtered = [0 < params[b].top_k < V or params[b].top_p < 1 for b in hot]
    picked = torch.empty(len(hot), dtype=torch.long, device=logits.device)
    for want in (False, True):
        i = [j for j, f in enumerate(filtered) if f == want]
        if not i:
            continue
        rows = [hot[j] for j in i]
        x = logits if len(rows) == B else logits[rows]
        temp = [params[b].temperature for b in rows]
        if want:  # the candidates, in descending order
            vals, ids = top_k_top_p(x, [params[b].top_k for b in rows], [params[b].top_p for b in rows], temp)
            picked[i] = ids.gather(1, _draw(vals.exp(), u[i])[:, None])[:, 0]
        else:  # the whole vocabulary, in id order
            t = torch.tensor(temp, dtype=x.dtype, device=x.device)[:, None]
            picked[i] = _draw(((x - x.amax(-1, keepdim=True)) / t).exp(), u[i])
    out[hot] = picked
    return out.tolist()


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF per row of non-negative weights [B, K] with uniforms u [B] in [0, 1) -> positions [B]; a zero
    weight is never picked."""
    cdf = weights.double().cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # < total
    return torch.searchsorted(cdf, target, right=True)[:, 0]
