"""Python chat API: load a checkpoint once, then `chat(messages, ...)` about images, documents and videos.

Notable:
- Inputs pass straight to the processor, which validates them (docs/architecture.md); this module adds sampling.
- Defaults are the release's `chat()` presets per mode (docs/reference.md 8.3, `SAMPLING_PRESETS`); any argument given
  wins; temperature=0 is greedy; unseeded sampling draws its seed from torch's global RNG.
- The reasoning/answer split (`split_output`): long mode splits at the first `</think>`; an unclosed block is all
  reasoning. Short mode is all answer unless the model opens a `<think>` block first. Leftover tags never reach
  `answer` or `reasoning`; `text` stays the raw decoded output.
- Streaming holds back bytes of an unfinished UTF-8 character, a possible partial tag and reasoning's trailing
  newlines, so every chunk is clean text and the concatenated deltas equal the non-streamed result (same seed).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlmcook.data.processor import Processor, TokenCount, collate
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.infer.engine import DEFAULT_MAX_NEW_TOKENS, Engine, Generation, SamplingParams

DEFAULT_MODEL_DIR = Path("runs") / "demo" / "model"  # the main job's checkpoint, relative to the current directory
SAMPLING_PRESETS = {  # docs/reference.md 8.3: the release's sampling presets per mode
    False: dict(temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.03),
    True: dict(temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.0),
}
THINK, END_THINK = "<think>", "</think>"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # visual slots included
    visual_tokens: int
    completion_tokens: int  # the stop token included
    total_tokens: int


@dataclass(frozen=True)
class Timings:
    preprocess_s: float  # messages -> ids and pixels (image decoding, video decoding)
    prefill_s: float  # the prefill forward (vision tower, resampler, LLM) = time to first token after preprocess
    decode_s: float
    vision_s: float = 0.0  # part of prefill_s: vision tower + resampler


class AnswerBudgetError(ValueError):
    """max_new_tokens alone fills the model's context (no prompt could fit)."""

    def __init__(self, max_new_tokens: int, context: int):
        self.max_new_tokens, self.context = max_new_tokens, context
        super().__init__(f"max_new_tokens={max_new_tokens} leaves no room for the prompt: the model's context is "
                         f"{context} tokens (prompt + answer)")


@dataclass(frozen=True)
class ChatResult:
    text: str  # the raw decoded completion (think tags included, the stop token excluded)
    reasoning: str
    answer: str
    finish_reason: str  # "stop" | "length"
    usage: Usage
    timings: Timings
    token_ids: list[int] = field(default_factory=list)
    prompt: TokenCount | None = None  # the prompt's accounting: each image's views, each video's packages and spans


@dataclass(frozen=True)
class ChatChunk:
    """A streamed piece: deltas of the raw text and of the reasoning / answer parts (any may be empty)."""

    text: str
    reasoning: str = ""
    answer: str = ""
    is_reasoning: bool = False  # the model is inside the think block after this chunk
    finish_reason: str | None = None  # set on the final chunk only
    usage: Usage | None = None  # final chunk only
    result: ChatResult | None = None  # final chunk only: the same ChatResult chat(stream=False) returns
    index: int = 0  # which of chat(n=...)'s samples this chunk belongs to


# ---- reasoning / answer split ------------------------------------------------------------------------------------
_TAGS = re.compile("</?think>")


def _strip_tags(s: str) -> str:
    # One pass: removing one tag must not join its neighbours into a new one ("</th<think>ink>").
    return _TAGS.sub("", s)


def split_output(text: str, thinking: bool | None) -> tuple[str, str, bool]:
    """Completion text -> (reasoning, answer, in_think_block). `thinking` = the prompt ended inside a think block."""
    if not thinking:
        head = text.lstrip()
        if not head.startswith(THINK):
            return "", _strip_tags(text).lstrip("\n"), False
        text = head[len(THINK):]
    if END_THINK not in text:
        return _strip_tags(text).strip("\n"), "", True
    head, _, tail = text.partition(END_THINK)
    return _strip_tags(head).strip("\n"), _strip_tags(tail).lstrip("\n"), False


def stable_split(text: str, thinking: bool | None) -> tuple[str, str, bool]:
    """The part of `split_output(text)` that no continuation of `text` can change (for streaming)."""
    for k in range(len(END_THINK) - 1, 0, -1):  # hold back a possible partial tag at the end
        if END_THINK.startswith(text[-k:]) or THINK.startswith(text[-k:]):
            text = text[:-k]
            break
    if not thinking and not text.strip():  # short mode: a think block may still open
        return "", "", False
    reasoning, answer, open_block = split_output(text, thinking)
    if open_block:
        reasoning = reasoning.rstrip("\n")  # the final strip would drop them if the block ended here
    return reasoning, answer, open_block


class _Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character (a byte-level token may hold part of one)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.pending, self.text = tokenizer, [], ""

    def add(self, token_id: int) -> str:
        self.pending.append(token_id)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd"):  # an incomplete character so far: wait for its next bytes
            return ""
        self.pending = []
        self.text += piece
        return piece


# ---- the model -----------------------------------------------------------------------------------------------------
class ChatModel:
    def __init__(self, model, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.processor = Processor(tokenizer, model.config)
        self.engine = Engine(model, tokenizer)

    @classmethod
    def load(cls, folder: str | Path | None = None, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None) -> "ChatModel":
        """A checkpoint folder in the released layout (default: the main job's `runs/demo/model`, relative to the
        current directory), with its tokenizer (`Tokenizer.for_model`). dtype default: float32 on CPU, bfloat16
        on CUDA; device default: CUDA when present."""
        from vlmcook.checkpoint import load_model, resolve_device

        device = resolve_device(device)  # before the slow load
        folder = Path(folder) if folder is not None else DEFAULT_MODEL_DIR
        if not (folder / "config.json").is_file():
            hint = ("run `make demo` (or `vlmcook demo`) first to train it, or pass a model folder"
                    if folder == DEFAULT_MODEL_DIR else "pass a folder holding config.json + safetensors shards")
            raise FileNotFoundError(f"no model checkpoint at {folder}: {hint}")
        if dtype is None:
            dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        model = load_model(folder, dtype=dtype, device=device)
        return cls(model, Tokenizer.for_model(folder, model.config.llm.vocab_size))

    # ---- public API -----------------------------------------------------------------------------------------
    def chat(self, messages, images: Sequence[Any] | None = None, thinking: bool = False, stream: bool = False,
             max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = None,
             think_budget: int | None = None, fps: float | None = None, max_frames: int | None = None,
             packing: int | None = None, max_visual_tokens: int | None = None,
             max_slice_nums: int | None = None,
             n: int = 1) -> ChatResult | list[ChatResult] | Iterator[ChatChunk]:
        """Answer a conversation (a str = one user message; else the processor's message format). Sampling
        arguments left None take the mode's preset (SAMPLING_PRESETS); max_new_tokens None = DEFAULT_MAX_NEW_TOKENS cut to
        the context left, an explicit value that does not fit raises ContextLengthError. Video knobs fill every
        video item that does not set its own. stream=True returns an iterator of ChatChunk whose last chunk
        carries the ChatResult; bad input raises here, before any chunk. n > 1: n samples from one prefill (a seed
        gives sample s the seed + s), a list of n ChatResults, or chunks of all of them told apart by `index`."""
        t0 = time.perf_counter()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        sample, params = self._prepare(messages, images, thinking, max_new_tokens, temperature, top_p, top_k,
                                       repetition_penalty, seed, think_budget, fps, max_frames, packing,
                                       max_visual_tokens, max_slice_nums)
        chunks = self._stream(sample, params, thinking, time.perf_counter() - t0, n)
        if stream:
            return chunks
        results = {c.index: c.result for c in chunks if c.result is not None}
        assert len(results) == n, "the stream ended without a final chunk"
        return results[0] if n == 1 else [results[i] for i in range(n)]

    def chat_batch(self, requests: Sequence[dict]) -> list[ChatResult]:
        """Independent requests (each a dict of `chat` arguments, without stream) decoded together in one batch."""
        t0 = time.perf_counter()
        prepared = []
        for i, req in enumerate(requests):
            try:
                prepared.append(self._prepare(**req))
            except (ValueError, TypeError) as e:
                raise type(e)(f"chat_batch request {i}: {e}") from e
        prep_s = time.perf_counter() - t0
        batch = collate([s for s, _ in prepared], self.tokenizer.pad_id, padding_side="left")
        gens = self.engine.generate(batch, [p for _, p in prepared])
        return [self._result(g, bool(req.get("thinking", False)), prep_s, s.get("count"))
                for g, req, (s, _) in zip(gens, requests, prepared)]

    def count_tokens(self, messages, images: Sequence[Any] | None = None, thinking: bool = False,
                     fps: float | None = None, max_frames: int | None = None, packing: int | None = None,
                     max_visual_tokens: int | None = None, max_slice_nums: int | None = None) -> TokenCount:
        """The prompt's token accounting without decoding pixels or video frames."""
        return self.processor.count_tokens(messages, images, thinking=thinking, max_slice_nums=max_slice_nums,
                                           fps=fps, max_frames=max_frames, packing=packing,
                                           max_visual_tokens=max_visual_tokens)

    # ---- internals ----------------------------------------------------------------------------------------------
    def _prepare(self, messages, images=None, thinking=False, max_new_tokens=None, temperature=None, top_p=None,
                 top_k=None, repetition_penalty=None, seed=None, think_budget=None, fps=None, max_frames=None,
                 packing=None, max_visual_tokens=None, max_slice_nums=None) -> tuple[dict, SamplingParams]:
        """One request -> (processor sample [1, T], SamplingParams); everything is validated before any decoding."""
        if not isinstance(thinking, bool):
            raise ValueError(f"thinking must be True or False, got {thinking!r}")
        if think_budget is not None and not thinking:
            raise ValueError("think_budget only applies with thinking=True (short mode has no think block)")
        preset = SAMPLING_PRESETS[thinking]
        given = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        sampling = {k: preset[k] if v is None else v for k, v in given.items()}
        params = SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                                seed=seed,
                                think_budget=think_budget, **sampling)  # checks every value
        context = self.engine.context_length
        if max_new_tokens is not None and max_new_tokens >= context:
            raise AnswerBudgetError(max_new_tokens, context)
        sample = self.processor(messages, images, thinking=thinking, max_slice_nums=max_slice_nums,
                                max_length=context, reserve=params.max_new_tokens if max_new_tokens else 1, fps=fps,
                                max_frames=max_frames, packing=packing, max_visual_tokens=max_visual_tokens)
        if max_new_tokens is None:  # the default is cut to the context left; an explicit value was checked
            params = replace(params, max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, context - sample["input_ids"].shape[1]))
        return sample, params

    def _stream(self, sample: dict, params: SamplingParams, thinking: bool, prep_s: float,
                n: int = 1) -> Iterator[ChatChunk]:
        detoks, sent = {}, {}  # per sample: its detokenizer, the reasoning / answer sent so far
        for ev in self.engine.stream(collate([sample], self.tokenizer.pad_id, "left"), params, num_samples=n):
            i, detok = ev.row, detoks.setdefault(ev.row, _Detokenizer(self.tokenizer))
            sent_r, sent_a = sent.get(i, ("", ""))
            if ev.generation is not None:
                res = self._result(ev.generation, thinking, prep_s, sample.get("count"))
                # The rest: bytes still pending, held-back tags / newlines (the prefix property is tested).
                yield ChatChunk(res.text[len(detok.text):], res.reasoning[len(sent_r):], res.answer[len(sent_a):],
                                split_output(res.text, thinking)[2], res.finish_reason, res.usage, res, i)
                continue
            piece = detok.add(ev.token_id)
            if not piece:
                continue
            r, a, open_block = stable_split(detok.text, thinking)
            dr, da = r[len(sent_r):], a[len(sent_a):]
            sent[i] = (sent_r + dr, sent_a + da)
            yield ChatChunk(piece, dr, da, open_block, index=i)

    def _result(self, g: Generation, thinking: bool, prep_s: float, prompt: TokenCount | None) -> ChatResult:
        text = self.tokenizer.decode(g.token_ids)
        reasoning, answer, _ = split_output(text, thinking)
        usage = Usage(g.prompt_tokens, g.visual_tokens, g.completion_tokens, g.prompt_tokens + g.completion_tokens)
        timings = Timings(prep_s, g.prefill_s, g.decode_s, g.vision_s)
        return ChatResult(text, reasoning, answer, g.finish_reason, usage, timings, list(g.token_ids), prompt)
