"""Python chat API: load a checkpoint once, then `chat(messages, ...)` about images, documents and videos.

Notable:
- Defaults follow the release's `chat()` sampling presets (spec 8.3): short mode (thinking=False) temperature 0.7,
  top_p 0.8, top_k 100, repetition_penalty 1.03; long mode (thinking=True) temperature 0.7, top_p 1.0, top_k 50
  (HF's defaults, which the release falls back to), repetition_penalty 1.0; max_new_tokens 2048. Any argument
  given wins; temperature=0 is greedy. Unseeded sampling draws its seed from torch's global RNG.
- Video knobs (fps, max_frames, packing, max_visual_tokens) given to `chat` apply to every video item that does
  not set its own; max_slice_nums goes to the processor (images and videos alike, an item's own setting wins).
- `images=` fills `(<image>./</image>)` markers in order; when the messages hold no marker, the images go in front
  of the last user message (the release's legacy `image=` does the same for the first message).
- The reasoning/answer split (`split_output`): long mode splits at the first `</think>`; an unclosed block is all
  reasoning (answer ""). Short mode is all answer unless the model opens a new `<think>` block first. Leftover
  `<think>`/`</think>` tags never reach `answer` (or `reasoning`); `text` stays the raw decoded output.
- Streaming decodes incrementally and holds back bytes of an unfinished UTF-8 character, a possible partial tag and
  reasoning's trailing newlines, so every chunk is clean text, and the concatenation of `text` / `reasoning` /
  `answer` deltas equals the non-streamed result's fields for the same seed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmcook.data.image import IMAGE_MARKER
from vlmcook.data.processor import Processor, TokenCount, collate
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.infer.engine import Engine, Generation, SamplingParams

DEFAULT_MODEL_DIR = Path("runs") / "demo" / "model"  # the main job's checkpoint, relative to the current directory
DEFAULT_MAX_NEW_TOKENS = 2048
PRESETS = {  # spec 8.3: the release's sampling presets per mode
    False: dict(temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.03),
    True: dict(temperature=0.7, top_p=1.0, top_k=50, repetition_penalty=1.0),
}
VIDEO_KNOBS = ("fps", "max_frames", "packing", "max_visual_tokens")
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


@dataclass(frozen=True)
class ChatResult:
    text: str  # the raw decoded completion (think tags included, the stop token excluded)
    reasoning: str
    answer: str
    finish_reason: str  # "stop" | "length"
    usage: Usage
    timings: Timings
    token_ids: list[int] = field(default_factory=list)


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
        current directory). Tokenizer: the folder's own files (tokenizer.json or vocab.json + merges.txt), else the
        built-in tiny one when the model's vocab_size is its 512. dtype default: float32 on CPU, bfloat16 on CUDA;
        device default: CUDA when present."""
        from vlmcook.checkpoint import load_model

        folder = Path(folder) if folder is not None else DEFAULT_MODEL_DIR
        if not (folder / "config.json").is_file():
            hint = ("run `make demo` (or `vlmcook demo`) first to train it, or pass a model folder"
                    if folder == DEFAULT_MODEL_DIR else "pass a folder holding config.json + safetensors shards")
            raise FileNotFoundError(f"no model checkpoint at {folder.resolve()}: {hint}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        model = load_model(folder, dtype=dtype, device=device)
        return cls(model, _tokenizer_for(folder, model.config.llm.vocab_size))

    # ---- public API -----------------------------------------------------------------------------------------
    def chat(self, messages, images: Sequence[Any] | None = None, thinking: bool = False, stream: bool = False,
             max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = None,
             think_budget: int | None = None, fps: float | None = None, max_frames: int | None = None,
             packing: int | None = None, max_visual_tokens: int | None = None,
             max_slice_nums: int | None = None) -> ChatResult | Iterator[ChatChunk]:
        """Answer a conversation (a str = one user message; else the processor's message format). Sampling
        arguments left None take the mode's preset (PRESETS); think_budget needs thinking=True. Video knobs fill
        every video item that does not set its own. stream=True returns an iterator of ChatChunk whose last chunk
        carries the ChatResult; bad input raises here, before any chunk."""
        req = dict(messages=messages, images=images, thinking=thinking, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                   seed=seed, think_budget=think_budget, fps=fps, max_frames=max_frames, packing=packing,
                   max_visual_tokens=max_visual_tokens, max_slice_nums=max_slice_nums)
        t0 = time.perf_counter()
        sample, params = self._prepare(req)  # errors surface here, before a stream is handed out
        chunks = self._stream(sample, params, thinking, time.perf_counter() - t0)
        if stream:
            return chunks
        for chunk in chunks:
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("the stream ended without a final chunk")

    def chat_batch(self, requests: Sequence[dict]) -> list[ChatResult]:
        """Independent requests (each a dict of `chat` arguments, without stream) decoded together in one batch."""
        if isinstance(requests, dict) or not requests:
            raise ValueError("chat_batch takes a non-empty list of request dicts (each with 'messages')")
        t0 = time.perf_counter()
        prepared = []
        for i, req in enumerate(requests):
            if not isinstance(req, dict) or "messages" not in req or req.get("stream"):
                raise ValueError(f"chat_batch: request {i} must be a dict of chat() arguments with 'messages' "
                                 f"and no stream")
            try:
                prepared.append(self._prepare({k: v for k, v in req.items() if k != "stream"}))
            except (ValueError, TypeError) as e:
                raise type(e)(f"chat_batch request {i}: {e}") from e
        prep_s = time.perf_counter() - t0
        batch = collate([s for s, _ in prepared], self.tokenizer.pad_id, padding_side="left")
        gens = self.engine.generate(batch, [p for _, p in prepared])
        return [self._result(g, bool(req.get("thinking", False)), prep_s) for g, req in zip(gens, requests)]

    def count_tokens(self, messages, images: Sequence[Any] | None = None, thinking: bool = False,
                     fps: float | None = None, max_frames: int | None = None, packing: int | None = None,
                     max_visual_tokens: int | None = None, max_slice_nums: int | None = None) -> TokenCount:
        """The prompt's token accounting without decoding pixels or video frames."""
        messages, images = self._messages(messages, images, dict(fps=fps, max_frames=max_frames, packing=packing,
                                                                  max_visual_tokens=max_visual_tokens))
        return self.processor.count_tokens(messages, images, thinking=thinking, max_slice_nums=max_slice_nums)

    # ---- internals ----------------------------------------------------------------------------------------------
    _ARGS = {"messages", "images", "thinking", "max_new_tokens", "temperature", "top_p", "top_k",
             "repetition_penalty", "seed", "think_budget", *VIDEO_KNOBS, "max_slice_nums"}

    def _prepare(self, req: dict) -> tuple[dict, SamplingParams]:
        """One request -> (processor sample [1, T], SamplingParams); validates everything first."""
        unknown = set(req) - self._ARGS
        if unknown:
            raise TypeError(f"unknown chat argument(s) {sorted(unknown)}; expected some of {sorted(self._ARGS)}")
        thinking = req.get("thinking", False)
        if not isinstance(thinking, bool):
            raise ValueError(f"thinking must be True or False, got {thinking!r}")
        params = self._params(req, thinking)
        messages, images = self._messages(req["messages"], req.get("images"), {k: req.get(k) for k in VIDEO_KNOBS})
        sample = self.processor(messages, images, thinking=thinking, max_slice_nums=req.get("max_slice_nums"),
                                max_length=self.engine.context_length - 1)
        return sample, params

    def _params(self, req: dict, thinking: bool) -> SamplingParams:
        budget = req.get("think_budget")
        if budget is not None and not thinking:
            raise ValueError("think_budget only applies with thinking=True (short mode has no think block)")
        preset = PRESETS[thinking]
        pick = {k: preset[k] if req.get(k) is None else req[k] for k in preset}
        max_new = DEFAULT_MAX_NEW_TOKENS if req.get("max_new_tokens") is None else req["max_new_tokens"]
        return SamplingParams(max_new_tokens=max_new, seed=req.get("seed"), think_budget=budget, **pick)

    def _messages(self, messages, images, knobs: dict) -> tuple[list[dict], list | None]:
        """Normalise messages: a str becomes a user turn; video knobs fill unset keys; marker-less images go in
        front of the last user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a str or a non-empty list of {'role', 'content'} dicts")
        knobs = {k: v for k, v in knobs.items() if v is not None}
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
            content = m.get("content")
            if isinstance(content, (list, tuple)) and knobs:
                content = [{**knobs, **it} if isinstance(it, dict) and it.get("type") == "video" else it
                           for it in content]
            out.append({**m, "content": content})
        if images and not any(IMAGE_MARKER in t for t in _texts(out)):
            users = [i for i, m in enumerate(out) if m.get("role") == "user"]
            if not users:
                raise ValueError("images were given but there is no user message to put them in")
            m = out[users[-1]]
            content = m["content"] if isinstance(m["content"], (list, tuple)) else [m["content"]]
            out[users[-1]] = {**m, "content": list(images) + list(content)}
            images = None
        return out, images

    def _stream(self, sample: dict, params: SamplingParams, thinking: bool, prep_s: float) -> Iterator[ChatChunk]:
        detok = _Detokenizer(self.tokenizer)
        sent_r = sent_a = ""
        for ev in self.engine.stream(collate([sample], self.tokenizer.pad_id, "left"), params):
            if ev.generation is not None:
                res = self._result(ev.generation, thinking, prep_s)
                # The rest: bytes still pending, held-back tags / newlines (the prefix property is tested).
                yield ChatChunk(res.text[len(detok.text):], res.reasoning[len(sent_r):], res.answer[len(sent_a):],
                                split_output(res.text, thinking)[2], res.finish_reason, res.usage, res)
                return
            piece = detok.add(ev.token_id)
            if not piece:
                continue
            r, a, open_block = stable_split(detok.text, thinking)
            dr, da = r[len(sent_r):], a[len(sent_a):]
            sent_r, sent_a = sent_r + dr, sent_a + da
            yield ChatChunk(piece, dr, da, open_block)

    def _result(self, g: Generation, thinking: bool, prep_s: float) -> ChatResult:
        text = self.tokenizer.decode(g.token_ids)
        reasoning, answer, _ = split_output(text, thinking)
        usage = Usage(g.prompt_tokens, g.visual_tokens, g.completion_tokens, g.prompt_tokens + g.completion_tokens)
        timings = Timings(prep_s, g.prefill_s, g.decode_s, g.vision_s)
        return ChatResult(text, reasoning, answer, g.finish_reason, usage, timings, list(g.token_ids))


def _texts(messages: list[dict]) -> Iterator[str]:
    for m in messages:
        content = m.get("content")
        for it in [content] if isinstance(content, str) else (content or []):
            if isinstance(it, str):
                yield it
            elif isinstance(it, dict) and it.get("type") == "text" and isinstance(it.get("text"), str):
                yield it["text"]


def _tokenizer_for(folder: Path, vocab_size: int) -> Tokenizer:
    """The folder's own tokenizer files, else the built-in tiny tokenizer when it fits the model's vocabulary."""
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return Tokenizer.from_dir(folder)
    tiny = Tokenizer.tiny()
    if tiny.vocab_size == vocab_size:
        return tiny
    raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json or vocab.json + merges.txt) and the "
                            f"model's vocab_size {vocab_size} does not match the built-in tiny tokenizer's "
                            f"{tiny.vocab_size}; copy the released tokenizer files into the folder")
