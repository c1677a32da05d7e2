"""An OpenAI-compatible HTTP server over `ChatModel`: `/health`, `/v1/models`, `/v1/chat/completions` (+ SSE).

`create_app(chat_model, settings)` builds the FastAPI app, `run(...)` serves it with uvicorn (the `serve` extra).
- The request is the pydantic model `ChatRequest`: every field, its type and bounds are declared there; unknown keys
  anywhere are refused. Bad input is a 4xx in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` whose
  `param` names the field (`messages[0].content[1].video_url.url`).
- The request becomes the processor's message format (vlmcook/data/processor.py), which checks the media: a
  `ValueError` from `ChatModel.chat` (bad image or video, prompt over the context) is a 400, anything else a 500
  that names no internals.
- Media: base64 data URLs, and files under `settings.allowed_media_dir` (symlinks resolved before the containment
  check; errors name the path the client sent). Nothing is fetched from the network: http(s) URLs are refused.
- Requests run together: each one's preprocessing and detokenizing on a thread of its own (`Worker`), its rows in
  the engine's running batch, which it joins at the next step and leaves as soon as it is done (engine.py); a
  seeded request gets the same answer alone or among others. Limits: rows running (`max_rows`), requests waiting
  to join (`max_queue`; more get 429 + Retry-After), KV-cache positions (`max_kv_tokens`; a request that can never
  fit gets 400); defaults from the model and the memory. When a client goes away (streaming or not), its rows
  leave the batch at the next step. `n` > 1: one prefill, n choices.
- Sampling fields left out take the release's presets for the mode (`api.SAMPLING_PRESETS`), not OpenAI's
  temperature 1; enable_thinking (or chat_template_kwargs.enable_thinking, as vLLM) defaults to False.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmcook.data import video
from vlmcook.data.processor import ContextLengthError
from vlmcook.infer.api import AnswerBudgetError
from vlmcook.infer.engine import MIN_TEMPERATURE, PENALTY_RANGE, QueueFullError, WontFitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "vlmcook"
    allowed_media_dir: Path | None = None  # None: local files refused
    max_request_mb: float = 32.0  # request body
    max_media_mb: float = 16.0  # one decoded data-URL image or video
    max_images: int = 8  # image parts per request (all messages)
    max_videos: int = 2  # video parts per request
    max_frames: int = 64  # frames sampled per video (the default and the ceiling of video_max_frames)
    # The engine's limits (engine.Limits); None keeps the engine's default, derived from the model and the memory.
    max_rows: int | None = None  # rows decoding together (a request with n choices takes n)
    max_queue: int | None = None  # requests waiting to join them; more get 429
    max_kv_tokens: int | None = None  # KV-cache positions; a request that can never fit gets 400

    def __post_init__(self):
        for name in ("max_request_mb", "max_media_mb", "max_frames", "max_images", "max_videos", "max_rows",
                     "max_queue", "max_kv_tokens"):
            value, zero_ok = getattr(self, name), name in ("max_images", "max_videos")
            if name.startswith(("max_rows", "max_queue", "max_kv")) and value is None:
                continue
            if not value >= 0 or (value == 0 and not zero_ok):
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: must be {'>= 0' if zero_ok else '> 0'}")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = \
            status, message, param, code, type, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the request ---------------------------------------------------------------------------------------------
MEDIA = {"image_url": "image", "image": "image", "video_url": "video", "video": "video"}  # part type -> kind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class MediaURL(_Strict):
    url: str = Field(min_length=1)  # data:<type>;base64,... | file:///path | a path under the allowed folder
    detail: Literal["auto", "low", "high"] | None = None  # accepted; views are always full resolution

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, v):  # {"image_url": "data:..."} = {"image_url": {"url": "data:..."}}
        return {"url": v} if isinstance(v, str) else v


class Part(_Strict):
    type: Literal["text", "image_url", "image", "video_url", "video"]
    text: str | None = None
    image_url: MediaURL | None = None
    image: MediaURL | None = None
    video_url: MediaURL | None = None
    video: MediaURL | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, v):  # a plain string in a content list is a text part
        return {"type": "text", "text": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _payload(self):
        given = [k for k in ("text", *MEDIA) if getattr(self, k) is not None]
        if given != [self.type]:
            raise ValueError(f"a {self.type!r} part holds the key {self.type!r} and no other payload, got {given}")
        return self


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer = system; no tool turns
    content: list[Part] = Field(min_length=1)
    name: str | None = None  # accepted; the chat template shows no names
    reasoning_content: str | None = None  # an earlier assistant turn's thinking, kept for multi-turn

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v):
        if not isinstance(v, (str, list)):
            raise ValueError("must be a string or a non-empty list of parts")
        return [v] if isinstance(v, str) else v


def _only(value: Any) -> Any:
    """A field accepted only at its no-op value (or null), so the output never silently differs from what was
    asked. A field the server learns to honour (n > 1, stop, ...) becomes an ordinary field."""
    def check(v):
        if v is not None and v != value:
            raise PydanticCustomError("unsupported_value", "not supported by this server: only {value} or null is "
                                      "accepted (remove the field)", {"value": repr(value)})
        return v
    return Annotated[Any, AfterValidator(check)]


class StreamOptions(_Strict):
    include_usage: bool | None = None


class TemplateKwargs(_Strict):
    enable_thinking: bool | None = None


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)  # None: ChatModel's default, cut to the context left
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 / 0: no top-k
    repetition_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    enable_thinking: bool | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    thinking_budget: int | None = Field(None, ge=0)
    max_slice_nums: int | None = Field(None, ge=1)  # at most the checkpoint's config.max_slice_nums
    video_fps: float | None = Field(None, gt=0, le=video.MAX_FPS)
    video_max_frames: int | None = Field(None, ge=1)  # at most settings.max_frames
    video_packing: int | None = Field(None, ge=1, le=video.MAX_PACKING)
    video_max_visual_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)  # choices, from one prefill; at most the engine's max_rows
    stop: _only([]) = None
    presence_penalty: _only(0) = None
    frequency_penalty: _only(0) = None
    logprobs: _only(False) = None
    top_logprobs: _only(0) = None
    logit_bias: _only({}) = None
    tools: _only([]) = None
    tool_choice: _only("none") = None
    response_format: _only({"type": "text"}) = None
    user: str | None = None  # this one and the ones below are ignored: they never change the output
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("temperature")
    @classmethod
    def _not_tiny(cls, t):
        if t and t < MIN_TEMPERATURE:
            raise ValueError(f"positive temperatures below {MIN_TEMPERATURE:g} are refused (engine.SamplingParams); "
                             f"use 0 for greedy")
        return t


def _validation_error(e: ValidationError) -> APIError:
    """pydantic's first error -> a 400 naming the field as `messages[0].content[1].video_url.url`."""
    errs = e.errors(include_url=False)
    err, more = errs[0], f" (and {len(errs) - 1} more problem(s))" if len(errs) > 1 else ""
    kind = err["type"]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".") or None
    if kind == "json_invalid":
        return APIError(400, f"malformed JSON body: {err['ctx']['error']}", None, "invalid_json")
    if param is None:
        return APIError(400, f"the request body must be a JSON object ({err['msg']})")
    if kind == "extra_forbidden":
        hint = " (use enable_thinking / thinking_budget)" if param.startswith("reasoning") else ""
        return APIError(400, f"unknown field {param!r}{hint}; the accepted fields are declared in "
                             f"vlmcook.infer.serve.ChatRequest{more}", param, "unknown_field")
    got = "" if kind == "missing" or isinstance(err["input"], dict) else "=" + repr(err["input"])
    got = got if len(got) <= 60 else got[:57] + "..."
    return APIError(400, f"{param}{got}: {err['msg'].removeprefix('Value error, ')}{more}", param,
                    "unsupported_field" if kind == "unsupported_value" else None)


# ---- request -> ChatModel.chat arguments ---------------------------------------------------------------------
def _media(url: str, where: str, settings: ServeSettings, paths: dict[str, str]) -> bytes | str:
    """A data URL -> its bytes; a file under the allowed folder -> its resolved path (what gets opened, so a symlink
    out of the folder is refused), remembered in `paths` with the path the client sent."""
    m = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]+):", url)  # one letter is a Windows drive, not a scheme
    scheme = m[1].lower() if m else ""
    if scheme == "data":
        head, _, payload = url.partition(",")
        if not head.endswith(";base64"):
            raise APIError(400, f"{where}: only base64 data URLs are supported (data:<type>;base64,<data>)", where)
        if len(payload) * 3 // 4 > settings.max_media_mb * 2**20 + 3:  # refused before decoding
            raise APIError(413, f"{where}: the data URL holds ~{len(payload) * 3 / 4 / 2**20:.1f} MB, more than the "
                                f"limit of {settings.max_media_mb:g} MB per image/video (--max-media-mb)", where,
                           "media_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"{where}: invalid base64 in the data URL ({e})", where) from None
    if scheme not in ("", "file"):
        why = ("remote URLs are not fetched by this server (no network access by design, and fetching for clients "
               "is a request-forgery risk)" if scheme in ("http", "https") else f"unsupported URL scheme {scheme!r}")
        raise APIError(400, f"{where}: {why}; send a data: URL or a file: under the allowed folder", where)
    if settings.allowed_media_dir is None:
        raise APIError(403, f"{where}: local files are disabled on this server (start it with --allowed-media-dir "
                            f"DIR); send the bytes as a data URL instead", where, "local_files_disabled")
    parsed = urlparse(url) if scheme else None
    if parsed and parsed.netloc not in ("", "localhost"):
        raise APIError(400, f"{where}: file URLs name a local path (file:///...), got host {parsed.netloc!r}", where)
    path = unquote(parsed.path) if parsed else url
    if "\x00" in path:
        raise APIError(400, f"{where}: invalid path", where)
    root = Path(settings.allowed_media_dir).resolve()
    real = (root / Path(path).expanduser()).resolve()  # an absolute path replaces root; every symlink followed
    if not real.is_relative_to(root):
        raise APIError(403, f"{where}: {url!r} is outside the allowed media folder (symlinks are resolved first)",
                       where, "path_not_allowed")
    if not real.is_file():
        raise APIError(400, f"{where}: no such file {url!r} under the allowed media folder", where, "file_not_found")
    paths[str(real)] = url
    return str(real)


def _messages(req: ChatRequest, settings: ServeSettings) -> tuple[list[dict], dict[str, str]]:
    """-> the processor's messages (media as bytes or checked paths), {server path: the path the client sent}."""
    out, paths, counts = [], {}, {"image": 0, "video": 0}
    limits = {"image": settings.max_images, "video": settings.max_videos}
    for i, m in enumerate(req.messages):
        content = []
        for j, p in enumerate(m.content):
            where, kind = f"messages[{i}].content[{j}]", MEDIA.get(p.type)
            if kind is None:
                content.append({"type": "text", "text": p.text})
                continue
            if m.role != "user":
                raise APIError(400, f"{where}: images and videos are only accepted in user messages", where)
            counts[kind] += 1
            if counts[kind] > limits[kind]:
                raise APIError(400, f"{where}: more than {limits[kind]} {kind}s in one request (--max-{kind}s)",
                               where, f"too_many_{kind}s")
            url = getattr(p, p.type).url
            content.append({"type": kind, kind: _media(url, f"{where}.{p.type}.url", settings, paths)})
        if m.reasoning_content is not None and m.role != "assistant":
            raise APIError(400, f"messages[{i}].reasoning_content is only accepted on assistant messages",
                           f"messages[{i}].reasoning_content")
        extra = {} if m.reasoning_content is None else {"reasoning_content": m.reasoning_content}
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content, **extra})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be an assistant message (continuing a reply is not "
                            "supported)", f"messages[{len(out) - 1}].role")
    if settings.allowed_media_dir is not None:  # replaced last: any other path under it
        paths[str(Path(settings.allowed_media_dir).resolve())] = "<allowed media folder>"
    return out, paths


def _chat_args(req: ChatRequest, settings: ServeSettings, max_slice_nums: int, max_rows: int) -> dict[str, Any]:
    """Cross-field rules and this server's limits -> keyword arguments of ChatModel.chat."""
    inner = req.chat_template_kwargs.enable_thinking if req.chat_template_kwargs else None
    if None not in (req.enable_thinking, inner) and req.enable_thinking != inner:
        raise APIError(400, "enable_thinking and chat_template_kwargs.enable_thinking disagree", "enable_thinking")
    thinking = bool(req.enable_thinking if req.enable_thinking is not None else inner)
    if req.thinking_budget is not None and not thinking:
        raise APIError(400, "thinking_budget needs enable_thinking=true (the fast mode has no think block)",
                       "thinking_budget")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    if (req.video_max_frames or 0) > settings.max_frames:
        raise APIError(400, f"video_max_frames={req.video_max_frames} is more than this server's limit of "
                            f"{settings.max_frames} frames per video (--max-frames)", "video_max_frames",
                       "too_many_frames")
    if (req.max_slice_nums or 0) > max_slice_nums:
        raise APIError(400, f"max_slice_nums={req.max_slice_nums} is more than the checkpoint's "
                            f"{max_slice_nums} (config.json slice_config)", "max_slice_nums")
    if (req.n or 1) > max_rows:
        raise APIError(400, f"n={req.n} is more than the {max_rows} rows this server decodes at once (--max-rows)",
                       "n", "too_many_choices")
    return dict(thinking=thinking, max_new_tokens=req.max_tokens or req.max_completion_tokens,
                temperature=req.temperature, top_p=req.top_p, top_k=None if req.top_k is None else max(req.top_k, 0),
                repetition_penalty=req.repetition_penalty, seed=req.seed, think_budget=req.thinking_budget,
                max_slice_nums=req.max_slice_nums, fps=req.video_fps, packing=req.video_packing,
                max_frames=req.video_max_frames or settings.max_frames, max_visual_tokens=req.video_max_visual_tokens,
                n=req.n or 1)


def _chat_error(e: Exception, paths: dict[str, str], context: int, asked: int | None) -> APIError:
    """An exception from ChatModel.chat -> the HTTP error: a ValueError is the request's fault (400; the server's
    paths replaced by the client's), anything else is ours (500; the details go to the log only)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return QueueFull(str(e))
    if isinstance(e, WontFitError):
        return APIError(400, f"this request cannot be served here: {e}", "max_tokens", "kv_cache_exceeded")
    if isinstance(e, AnswerBudgetError):
        return APIError(400, f"this model's maximum context length is {e.context} tokens and {e.max_new_tokens} "
                             f"completion tokens were requested; lower max_tokens", "max_tokens",
                        "context_length_exceeded")
    if isinstance(e, ContextLengthError):
        asked_text = f" and {asked} completion tokens were requested" if asked else ""
        return APIError(400, f"this model's maximum context length is {context} tokens; the prompt is "
                             f"{e.prompt_tokens} tokens{asked_text}; shorten the prompt, use fewer images/frames"
                             f"{', or lower max_tokens' if asked else ''}", "messages", "context_length_exceeded")
    if isinstance(e, ValueError):
        msg = str(e)
        for real, sent in paths.items():
            msg = msg.replace(real, sent)
        return APIError(400, f"invalid input: {msg}", "messages", "invalid_input")
    log.error("generation failed", exc_info=e)
    return APIError(500, f"generation failed ({type(e).__name__}); the server log has the details", None,
                    "internal_error", "server_error")


# ---- the generation worker -------------------------------------------------------------------------------------
class QueueFull(APIError):
    def __init__(self, why: str):
        super().__init__(429, f"the server is busy: {why}; retry shortly", None, "queue_full", "server_error",
                         {"Retry-After": "1"})


class Worker:
    """Runs each request's job (preprocessing, then reading the engine's events and detokenizing) on a thread of
    its own, at most `limit` at once (the engine's rows + its queue); beyond that a request gets 429 before its body
    is read. The engine batches the jobs' generations."""

    def __init__(self, limit: int):
        self.pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="vlmcook-request")
        self.limit, self.active, self.cancelled = limit, 0, 0

    def admit(self) -> None:
        if self.active >= self.limit:
            raise QueueFull(f"{self.active} requests are in progress (--max-rows + --max-queue)")

    async def stream(self, make_iter: Callable[[], Any], stop: threading.Event | None = None) -> AsyncIterator[Any]:
        """Iterate `make_iter()` on a worker thread, yielding its items here. Closing this generator, or setting
        `stop` (client gone; a cancelled task cannot await the close), stops the thread's loop at the next item and
        closes the iterator: the engine drops its rows."""
        self.admit()
        self.active += 1
        loop, queue, stop = asyncio.get_running_loop(), asyncio.Queue(), stop or threading.Event()

        def put(kind, x):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, x))
            except RuntimeError:  # the event loop is gone (server shutting down)
                stop.set()

        def job():
            try:
                it = iter(make_iter())
                try:
                    for item in it:
                        if stop.is_set():
                            self.cancelled += 1
                            break
                        put("item", item)
                finally:
                    getattr(it, "close", lambda: None)()
            except Exception as e:  # handed to the request, which turns it into an HTTP error
                return put("error", e)
            put("end", None)

        try:
            self.pool.submit(job)
            while (msg := await queue.get())[0] != "end":
                if msg[0] == "error":
                    raise msg[1]
                yield msg[1]
        finally:
            self.active -= 1
            stop.set()


# ---- replies ----------------------------------------------------------------------------------------------------
def _usage(usages: list) -> dict:  # api.Usage of each choice -> OpenAI usage (the prompt counted once)
    prompt, completion = usages[0].prompt_tokens, sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"visual_tokens": usages[0].visual_tokens, "cached_tokens": 0}}


def _completion(results: list, rid: str, created: int, model: str) -> dict:  # api.ChatResults -> chat.completion
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "logprobs": None, "finish_reason": r.finish_reason,
                         "message": {"role": "assistant", "content": r.answer,
                                     "reasoning_content": r.reasoning or None}}
                        for i, r in enumerate(results)],
            "usage": _usage([r.usage for r in results]), "timings": vars(results[0].timings)}


async def _results(request: Request, chunks: AsyncIterator, stop: threading.Event) -> list | None:
    """The final ChatResult of each choice, in order; None when the client goes away first (the generation is then
    closed: its rows leave the engine's batch at the next step)."""
    async def collect():
        return {c.index: c.result async for c in chunks if c.result is not None}

    async def gone():  # the body is read: the next ASGI message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
    await asyncio.wait({done, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not done.done():
        stop.set()
        done.cancel()
        await asyncio.gather(done, return_exceptions=True)
        return None
    results = done.result()
    return [results[i] for i in sorted(results)]


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


async def _sse_stream(first: Any, chunks: AsyncIterator, stop: threading.Event, n: int, include_usage: bool,
                      error: Callable, rid: str, created: int, model: str) -> AsyncIterator[bytes]:
    """ChatChunks -> chat.completion.chunk events whose deltas carry reasoning_content or content (the API split
    them, tags removed), a finish chunk as each choice ends, the usage chunk (include_usage) and [DONE]."""
    def event(choice: dict | None, **extra) -> bytes:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"logprobs": None, **choice}] if choice else [], **extra})

    for i in range(n):
        yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    usages, item = {}, first
    try:
        while item is not None:
            delta = {k: v for k, v in (("reasoning_content", item.reasoning), ("content", item.answer)) if v}
            if delta:
                yield event({"index": item.index, "delta": delta, "finish_reason": None})
            if item.result is not None:
                usages[item.index] = item.usage
                yield event({"index": item.index, "delta": {}, "finish_reason": item.finish_reason})
            item = await anext(chunks, None)
    except Exception as e:  # headers are sent: report in-band, as OpenAI-style servers do
        yield _sse(error(e).body()) + _sse(b"[DONE]")
        return
    finally:
        stop.set()  # first: when the client is gone this task is cancelled, and the await below is cancelled too
        await chunks.aclose()
    if include_usage:
        yield event(None, usage=_usage([usages[i] for i in sorted(usages)]))
    yield _sse(b"[DONE]")


# ---- the app ----------------------------------------------------------------------------------------------------
async def _read_body(request: Request, settings: ServeSettings) -> bytes:
    limit, body = int(settings.max_request_mb * 2**20), bytearray()
    too_big = APIError(413, f"request body is more than the limit of {settings.max_request_mb:g} MB "
                            f"(--max-request-mb)", None, "request_too_large")
    if request.headers.get("content-length", "").isdigit() and int(request.headers["content-length"]) > limit:
        raise too_big
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_big
    return bytes(body)


def create_app(chat_model: Any, settings: ServeSettings | None = None) -> FastAPI:
    settings, engine = settings or ServeSettings(), chat_model.engine
    names = ("max_rows", "max_queue", "max_kv_tokens")
    engine.limits = limits = replace(engine.limits, **{k: getattr(settings, k) for k in names
                                                       if getattr(settings, k) is not None})
    worker, started = Worker(limits.max_rows + limits.max_queue), int(time.time())
    context, max_slice_nums = engine.context_length, chat_model.model.config.max_slice_nums

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.pool.shutdown(wait=False, cancel_futures=True)  # queued jobs are dropped at shutdown

    app = FastAPI(title="vlmcook", version="0.1.0", lifespan=lifespan)

    async def _error(request, e: Exception):  # APIError; unknown routes; our bugs (a 500, the server keeps serving)
        if isinstance(e, StarletteHTTPException):
            e = APIError(e.status_code, str(e.detail))
        elif not isinstance(e, APIError):  # starlette logs the traceback
            e = APIError(500, f"internal error ({type(e).__name__})", None, "internal_error", "server_error")
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    for kind in (APIError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, _error)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "requests": worker.active, **engine.load(),
                "cancelled_requests": worker.cancelled, "limits": {k: getattr(limits, k) for k in names}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": started,
                                            "owned_by": "vlmcook", "max_model_len": context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        worker.admit()  # a busy server refuses before the body is read
        try:
            req = ChatRequest.model_validate_json(await _read_body(request, settings))
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model is not None and req.model != settings.model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves "
                                f"{settings.model_name!r} (see /v1/models)", "model", "model_not_found")
        call = _chat_args(req, settings, max_slice_nums, limits.max_rows)
        messages, paths = _messages(req, settings)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def error(e: Exception) -> APIError:
            return _chat_error(e, paths, context, call["max_new_tokens"])

        try:
            stop = threading.Event()
            chunks = worker.stream(lambda: chat_model.chat(messages, stream=True, **call), stop)
            if not req.stream:
                results = await _results(request, chunks, stop)
                if results is None:  # nobody is listening; the status is for the log
                    return JSONResponse(APIError(499, "the client closed the request").body(), status_code=499)
                return _completion(results, rid, created, settings.model_name)
            first = await anext(chunks, None)  # chat() raises on bad input before its first chunk: a plain 4xx
        except Exception as e:
            raise error(e) from None
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse_stream(first, chunks, stop, call["n"], usage, error, rid, created,
                                             settings.model_name),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def run(chat_model: Any, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
        log_level: str = "info") -> None:
    """Serve a loaded ChatModel until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(create_app(chat_model, settings), host=host, port=port, log_level=log_level)
