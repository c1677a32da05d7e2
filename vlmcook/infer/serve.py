"""An OpenAI-compatible HTTP server over `ChatModel`: `/health`, `/v1/models`, `/v1/chat/completions` (+ SSE).

`create_app(chat_model, settings)` builds the FastAPI app (tests use it on a tiny model); `run(...)` serves it with
uvicorn. fastapi / uvicorn are the optional extra `serve`; nothing else in vlmcook imports this module.

Notable:
- One generation at a time. The model, its KV cache and torch's RNG are not thread-safe, so every generation runs on
  a single worker thread in arrival order while the event loop keeps accepting, validating and queueing requests.
  A request with a `seed` therefore gets the same answer alone or among concurrent ones. A stream holds the worker
  until it ends or its client disconnects (then generation stops at the next token).
- Requests are validated before they queue (fields, media URLs and sizes, image headers, video probes, token count)
  and pixel decoding errors surface when the worker preprocesses, before any output. Each error is a 4xx in
  OpenAI's shape `{"error": {"message", "type", "param", "code"}}` naming the field (`messages[0].content[1]...`):
  malformed JSON (400), a body over `max_request_mb` (413), a decoded data-URL image/video over `max_media_mb`
  (413), too many images / videos (400), a bad role or part, a missing file (400), a path outside the allowed
  folder (403), a corrupt image or video (400), a prompt (+ max_tokens) over the context length (400).
- Media: `data:<type>;base64,...` URLs, and local files (`file:///abs/path` or a plain path, relative ones taken
  under the folder) only when the server was started with an allowed folder. Paths are resolved (symlinks
  followed) *before* the containment check and the resolved path is what gets opened, so a symlink inside the
  folder pointing outside it is refused. http(s) URLs are refused: the server fetches nothing from the network
  (fetching arbitrary URLs on a client's behalf is a server-side request forgery risk, and this project runs
  offline by design); clients send the bytes as a data URL instead.
- Request fields. Understood: model, messages, stream, stream_options.include_usage, max_tokens /
  max_completion_tokens, temperature, top_p, top_k, seed, repetition_penalty, enable_thinking (top level or
  chat_template_kwargs.enable_thinking, as vLLM accepts; default False = the released fast mode), thinking_budget,
  video_fps, video_max_frames, video_packing, video_max_visual_tokens, max_slice_nums. Ignored because they never
  change the output: user, metadata, store, service_tier, parallel_tool_calls, prompt_cache_key, safety_identifier.
  Accepted only at their no-op value (anything else is a 400, never silently dropped): n=1, stop=null/[],
  presence_penalty=0, frequency_penalty=0, logprobs=false, top_logprobs=0/null, logit_bias={}, tools=[],
  tool_choice="none", response_format={"type": "text"}. Any other field is a 400 naming it.
- Sampling fields left out take the release's presets for the mode (`vlmcook.infer.api.PRESETS`: temperature 0.7,
  ...), not OpenAI's temperature 1; max_tokens defaults to `settings.max_tokens`, cut to the context left.
- Message roles: system, user, assistant (`reasoning_content` kept for multi-turn); `developer` is taken as system.
  Tool messages are refused (the chat format here renders no tool calls).
- Reply: `choices[0].message.content` = the answer, `reasoning_content` = the thinking (null when empty), usage =
  prompt / completion / total tokens + `prompt_tokens_details.visual_tokens`; streaming sends
  `chat.completion.chunk`s whose deltas carry `reasoning_content` or `content`, then (with
  stream_options.include_usage) a usage chunk, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "vlmcook"
    allowed_media_dir: Path | None = None  # None: local files refused
    max_request_mb: float = 32.0  # request body
    max_media_mb: float = 16.0  # one decoded data-URL image or video
    max_images: int = 8  # image parts per request (all messages)
    max_videos: int = 2  # video parts per request
    max_frames: int = 64  # frames sampled per video (the default and the ceiling of video_max_frames)
    max_tokens: int = 512  # default completion budget (capped by the context left)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error_body(message: str, type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- request parsing ---------------------------------------------------------------------------------------------
_GEN_FIELDS = {"temperature", "top_p", "top_k", "seed", "repetition_penalty", "max_tokens", "max_completion_tokens",
               "thinking_budget"}
_VIDEO_FIELDS = {"video_fps": "fps", "video_max_frames": "max_frames", "video_packing": "packing",
                 "video_max_visual_tokens": "max_visual_tokens"}
_KNOWN = {"model", "messages", "stream", "stream_options", "enable_thinking", "chat_template_kwargs",
          "max_slice_nums", *_GEN_FIELDS, *_VIDEO_FIELDS}
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "safety_identifier"}
# field -> values that mean "do nothing different" (None is always accepted)
_NOOP_ONLY = {"n": (1,), "stop": ([],), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
              "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],),
              "tool_choice": ("none",), "response_format": ({"type": "text"},)}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


@dataclass
class ChatRequest:
    messages: list[dict]  # processor format, media resolved to bytes / checked paths
    thinking: bool
    stream: bool
    include_usage: bool
    gen: dict[str, Any]  # keyword arguments for ChatModel.chat


def _number(body: dict, key: str, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (kind is float or float(v).is_integer())
    if not ok:
        raise APIError(400, f"{key} must be {'a number' if kind is float else 'an integer'}, got {v!r}", key)
    v = kind(v)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise APIError(400, f"{key}={v} is out of range {rng}", key)
    return v


def _check_fields(body: dict) -> None:
    for key, value in body.items():
        if key in _KNOWN or key in _IGNORED:
            continue
        if key in _NOOP_ONLY:
            if value is not None and value not in _NOOP_ONLY[key]:
                raise APIError(400, f"{key}={value!r} is not supported by this server (only "
                                    f"{_NOOP_ONLY[key][0]!r} or null is accepted, so the output never silently "
                                    f"differs from what was asked); remove the field", key, "unsupported_field")
            continue
        hint = " (use enable_thinking / thinking_budget)" if key.startswith("reasoning") else ""
        raise APIError(400, f"unknown field {key!r}{hint}; see vlmcook.infer.serve for the accepted fields", key,
                       "unknown_field")


def _thinking(body: dict) -> bool:
    top = body.get("enable_thinking")
    kw = body.get("chat_template_kwargs")
    inner = None
    if kw is not None:
        if not isinstance(kw, dict):
            raise APIError(400, "chat_template_kwargs must be an object", "chat_template_kwargs")
        extra = set(kw) - {"enable_thinking"}
        if extra:
            raise APIError(400, f"chat_template_kwargs: unsupported keys {sorted(extra)} (only enable_thinking)",
                           "chat_template_kwargs")
        inner = kw.get("enable_thinking")
    for name, v in (("enable_thinking", top), ("chat_template_kwargs.enable_thinking", inner)):
        if v is not None and not isinstance(v, bool):
            raise APIError(400, f"{name} must be true or false, got {v!r}", name)
    if top is not None and inner is not None and top != inner:
        raise APIError(400, "enable_thinking and chat_template_kwargs.enable_thinking disagree", "enable_thinking")
    return bool(top if top is not None else inner)


def _gen_kwargs(body: dict, settings: ServeSettings) -> dict[str, Any]:
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    mt = _number(body, "max_tokens", int, 1) or _number(body, "max_completion_tokens", int, 1)
    gen = {"max_new_tokens": mt,
           "temperature": _number(body, "temperature", float, 0, 2),
           "top_p": _number(body, "top_p", float, 0, 1, lo_open=True),
           "top_k": _number(body, "top_k", int, -1),
           "repetition_penalty": _number(body, "repetition_penalty", float, 0, lo_open=True),
           "seed": _number(body, "seed", int, 0, 2**63 - 1),
           "think_budget": _number(body, "thinking_budget", int, 0),
           "max_slice_nums": _number(body, "max_slice_nums", int, 1, 9)}
    if gen["top_k"] in (-1, 0):  # OpenAI-style "no top-k"
        gen["top_k"] = None
    return {k: v for k, v in gen.items() if v is not None}


def _video_knobs(body: dict, settings: ServeSettings) -> dict[str, Any]:
    knobs = {"fps": _number(body, "video_fps", float, 0, 10, lo_open=True),
             "max_frames": _number(body, "video_max_frames", int, 1),
             "packing": _number(body, "video_packing", int, 1, 6),
             "max_visual_tokens": _number(body, "video_max_visual_tokens", int, 1)}
    if knobs["max_frames"] is not None and knobs["max_frames"] > settings.max_frames:
        raise APIError(400, f"video_max_frames={knobs['max_frames']} is more than this server's limit of "
                            f"{settings.max_frames} frames per video (--max-frames)", "video_max_frames",
                       "too_many_frames")
    knobs["max_frames"] = knobs["max_frames"] or settings.max_frames
    return {k: v for k, v in knobs.items() if v is not None}


def _data_url(url: str, where: str, settings: ServeSettings) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise APIError(400, f"{where}: only base64 data URLs are supported (data:<type>;base64,<data>)", where)
    limit = int(settings.max_media_mb * 2**20)
    if len(payload) * 3 // 4 > limit + 3:  # refuse before decoding
        raise APIError(413, f"{where}: the data URL holds ~{len(payload) * 3 / 4 / 2**20:.1f} MB, more than the "
                            f"limit of {settings.max_media_mb:g} MB per image/video (--max-media-mb)", where,
                       "media_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: invalid base64 in the data URL ({e})", where) from None
    if not data:
        raise APIError(400, f"{where}: the data URL is empty", where)
    return data


def _local_path(url: str, where: str, settings: ServeSettings) -> str:
    if url.lower().startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise APIError(400, f"{where}: file URLs must name a local path (file:///...), got host "
                                f"{parsed.netloc!r}", where)
        url = unquote(parsed.path)
    if settings.allowed_media_dir is None:
        raise APIError(403, f"{where}: local files are disabled on this server (start it with "
                            f"--allowed-media-dir DIR); send the bytes as a data URL instead", where,
                       "local_files_disabled")
    if not url or "\x00" in url:
        raise APIError(400, f"{where}: empty or invalid path", where)
    root = Path(settings.allowed_media_dir).resolve()
    path = Path(url).expanduser()
    real = (path if path.is_absolute() else root / path).resolve()  # follows every symlink
    if not real.is_relative_to(root):
        raise APIError(403, f"{where}: {url!r} is outside the allowed media folder (symlinks are resolved "
                            f"first)", where, "path_not_allowed")
    if not real.is_file():
        raise APIError(400, f"{where}: no such file {url!r} under the allowed media folder", where, "file_not_found")
    return str(real)


def _media(url: Any, where: str, settings: ServeSettings) -> bytes | str:
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: expected a non-empty string URL", where)
    m = _SCHEME.match(url)
    scheme = m.group(1).lower() if m and len(m.group(1)) > 1 else ""  # "C:" is a drive, not a scheme
    if scheme == "data":
        return _data_url(url, where, settings)
    if scheme in ("http", "https"):
        raise APIError(400, f"{where}: remote URLs are not fetched by this server (no network access by design, "
                            f"and fetching arbitrary URLs is a security risk); send the bytes as a "
                            f"data:<type>;base64,... URL or a file under the allowed folder", where,
                       "remote_url_not_supported")
    if scheme not in ("", "file"):
        raise APIError(400, f"{where}: unsupported URL scheme {scheme!r} (use data: or file:)", where)
    return _local_path(url, where, settings)


def _url_of(part: dict, key: str, where: str) -> Any:
    """`{"image_url": {"url": u}}` or `{"image_url": u}`; `{"type": "video", "video": u}` too."""
    v = part.get(key)
    if isinstance(v, dict):
        extra = set(v) - {"url", "detail"}
        if extra:
            raise APIError(400, f"{where}.{key}: unknown keys {sorted(extra)}", f"{where}.{key}")
        return v.get("url")
    return v


def _part(part: Any, where: str, settings: ServeSettings, knobs: dict, counts: dict) -> Any:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise APIError(400, f"{where}: a content part must be an object with a 'type'", where)
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.text must be a string", f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "image"):
        counts["images"] += 1
        if counts["images"] > settings.max_images:
            raise APIError(400, f"{where}: more than {settings.max_images} images in one request (--max-images)",
                           where, "too_many_images")
        key = "image_url" if "image_url" in part else "image"
        src = _media(_url_of(part, key, where), f"{where}.{key}.url", settings)
        return {"type": "image", "image": src}
    if kind in ("video_url", "video"):
        counts["videos"] += 1
        if counts["videos"] > settings.max_videos:
            raise APIError(400, f"{where}: more than {settings.max_videos} videos in one request", where,
                           "too_many_videos")
        key = "video_url" if "video_url" in part else "video"
        src = _media(_url_of(part, key, where), f"{where}.{key}.url", settings)
        return {"type": "video", "video": src, **knobs}
    raise APIError(400, f"{where}: unsupported content part type {kind!r} (text, image_url, video_url)",
                   f"{where}.type")


def _messages(body: dict, settings: ServeSettings, knobs: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out, counts = [], {"images": 0, "videos": 0}
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        extra = set(m) - {"role", "content", "name", "reasoning_content"}
        if extra:
            raise APIError(400, f"{where}: unknown keys {sorted(extra)}", where, "unknown_field")
        role = m.get("role")
        if role not in _ROLES:
            raise APIError(400, f"{where}.role {role!r} is not supported (system, developer, user, assistant)",
                           f"{where}.role", "invalid_role")
        content = m.get("content")
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list) and content:
            parts = [_part(p, f"{where}.content[{j}]", settings, knobs, counts) for j, p in enumerate(content)]
        else:
            raise APIError(400, f"{where}.content must be a string or a non-empty list of parts",
                           f"{where}.content")
        if role != "user" and any(isinstance(p, dict) and p["type"] != "text" for p in parts):
            raise APIError(400, f"{where}: images and videos are only accepted in user messages", where)
        msg = {"role": _ROLES[role], "content": parts[0] if isinstance(content, str) else parts}
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant" or not isinstance(reasoning, str):
                raise APIError(400, f"{where}.reasoning_content must be a string on an assistant message",
                               f"{where}.reasoning_content")
            msg["reasoning_content"] = reasoning
        out.append(msg)
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be an assistant message (continuing a reply is not "
                            "supported)", f"messages[{len(out) - 1}].role")
    return out


def parse_request(body: Any, settings: ServeSettings) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or APIError naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None)
    _check_fields(body)
    if body.get("model") is not None and body["model"] != settings.model_name:
        raise APIError(404, f"model {body['model']!r} is not served here; this server serves "
                            f"{settings.model_name!r} (see /v1/models)", "model", "model_not_found")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise APIError(400, "stream_options may only hold include_usage", "stream_options")
    knobs = _video_knobs(body, settings)
    messages = _messages(body, settings, knobs)
    thinking, gen = _thinking(body), _gen_kwargs(body, settings)
    if "think_budget" in gen and not thinking:
        raise APIError(400, "thinking_budget needs enable_thinking=true (the fast mode has no think block)",
                       "thinking_budget")
    return ChatRequest(messages, thinking, stream, bool(opts.get("include_usage")), gen)


# ---- the single generation worker -------------------------------------------------------------------------------
class Worker:
    """Runs jobs one at a time, in arrival order, on one thread (the model is not thread-safe)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmcook-generate")
        self.lock = threading.Lock()  # belt and braces: a job never overlaps another even if the pool changed
        self.waiting = 0  # jobs queued or running
        self.cancelled = 0  # streams stopped early because their client went away

    def _locked(self, fn: Callable, *args) -> Any:
        with self.lock:
            return fn(*args)

    async def run(self, fn: Callable, *args) -> Any:
        self.waiting += 1
        try:
            return await asyncio.wrap_future(self.pool.submit(self._locked, fn, *args))
        finally:
            self.waiting -= 1

    async def stream(self, make_iter: Callable[[], Any]) -> AsyncIterator[Any]:
        """Iterate `make_iter()` on the worker thread, yielding its items here; closing this generator (client
        gone) stops the worker's loop at the next item."""
        loop, queue, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def put(kind, x):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, x))
            except RuntimeError:  # the event loop is gone (server shutting down)
                stop.set()

        def job():
            try:
                it = make_iter()
                try:
                    for item in it:
                        put("item", item)
                        if stop.is_set():
                            self.cancelled += 1
                            break
                finally:
                    getattr(it, "close", lambda: None)()
            except Exception as e:  # handed to the request, which turns it into an HTTP error
                put("error", e)
                return
            put("end", None)

        self.waiting += 1
        self.pool.submit(self._locked, job)
        try:
            while True:
                kind, x = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise x
                yield x
        finally:
            self.waiting -= 1
            stop.set()


# ---- replies ----------------------------------------------------------------------------------------------------
def _usage(u) -> dict:  # api.Usage -> OpenAI usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"visual_tokens": u.visual_tokens, "cached_tokens": 0}}


def _completion(r, rid: str, created: int, model: str) -> dict:  # api.ChatResult -> chat.completion
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "logprobs": None, "finish_reason": r.finish_reason,
                         "message": {"role": "assistant", "content": r.answer,
                                     "reasoning_content": r.reasoning or None}}],
            "usage": _usage(r.usage), "timings": vars(r.timings)}


def _chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def _delta(chunk: Any) -> dict:
    """A ChatChunk -> an OpenAI delta: its reasoning text goes to reasoning_content, its answer text to content
    (the API already split them cleanly, tags removed)."""
    delta = {}
    if chunk.reasoning:
        delta["reasoning_content"] = chunk.reasoning
    if chunk.answer:
        delta["content"] = chunk.answer
    return delta


# ---- the app ----------------------------------------------------------------------------------------------------
def _prepare(chat_model: Any, req: ChatRequest, settings: ServeSettings) -> None:
    """Token count (image headers and video probes only, no pixel decoding) -> context check + max_new_tokens."""
    limit = chat_model.engine.context_length
    try:
        count = chat_model.count_tokens(req.messages, thinking=req.thinking,
                                        max_slice_nums=req.gen.get("max_slice_nums"))
    except APIError:
        raise
    except (ValueError, OSError) as e:  # bad image/video header, bad knobs: the user's input
        raise APIError(400, f"invalid media or prompt: {e}", "messages", "invalid_input") from None
    n, asked = count.total, req.gen.get("max_new_tokens")
    if n >= limit or (asked is not None and n + asked > limit):
        raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt is {n} tokens"
                            f"{f' and {asked} completion tokens were requested' if asked else ''}; shorten the "
                            f"prompt, use fewer images/frames{', or lower max_tokens' if asked else ''}",
                       "messages", "context_length_exceeded")
    req.gen.setdefault("max_new_tokens", min(settings.max_tokens, limit - n))


async def _read_json(request: Request, settings: ServeSettings) -> Any:
    limit = int(settings.max_request_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {int(declared) / 2**20:.1f} MB, more than the limit of "
                            f"{settings.max_request_mb:g} MB (--max-request-mb)", None, "request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"request body is more than the limit of {settings.max_request_mb:g} MB "
                                f"(--max-request-mb)", None, "request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", None, "invalid_json") from None


def _input_error(e: Exception) -> APIError:
    """An exception from ChatModel.chat -> the HTTP error to send. ValueError (incl. ImageError / VideoError)
    means the request's content was unusable; anything else is our fault."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, (ValueError, OSError)):
        return APIError(400, f"invalid input: {e}", "messages", "invalid_input")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "internal_error", "server_error")


def create_app(chat_model: Any, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    worker = Worker()

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.pool.shutdown(wait=False, cancel_futures=True)  # queued jobs are dropped at shutdown

    app = FastAPI(title="vlmcook", version="0.1.0", lifespan=lifespan)
    app.state.worker, app.state.settings, app.state.chat_model = worker, settings, chat_model
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(_error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return JSONResponse(_error_body(str(e.detail), "invalid_request_error", None, None),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(_error_body(str(e), "invalid_request_error", None, None), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, e):  # our bug: still a JSON error, and the server keeps serving
        return JSONResponse(_error_body(f"internal error: {type(e).__name__}: {e}", "server_error", None,
                                        "internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "waiting": worker.waiting,
                "cancelled_streams": worker.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": started,
                                            "owned_by": "vlmcook", "max_model_len": chat_model.engine.context_length}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await _read_json(request, settings), settings)
        await asyncio.to_thread(_prepare, chat_model, req, settings)  # file IO off the event loop
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        call = dict(thinking=req.thinking, **req.gen)
        if not req.stream:
            try:
                result = await worker.run(lambda: chat_model.chat(req.messages, stream=False, **call))
            except Exception as e:
                raise _input_error(e) from None
            return _completion(result, rid, created, settings.model_name)
        chunks = worker.stream(lambda: chat_model.chat(req.messages, stream=True, **call))
        try:  # the first chunk comes after the prompt is processed: input errors are still a clean 4xx here
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            raise _input_error(e) from None
        return StreamingResponse(_sse_stream(first, chunks, req, rid, created, settings.model_name),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


async def _sse_stream(first: Any, chunks: AsyncIterator, req: ChatRequest, rid: str, created: int,
                      model: str) -> AsyncIterator[bytes]:
    yield _sse(_chunk(rid, created, model, {"role": "assistant", "content": ""}))
    finish, usage = None, None
    try:
        item = first
        while item is not None:
            delta = _delta(item)
            if delta:
                yield _sse(_chunk(rid, created, model, delta))
            finish, usage = item.finish_reason or finish, item.usage or usage
            item = await chunks.__anext__()
    except StopAsyncIteration:
        pass
    except Exception as e:  # headers are sent: report in-band, as OpenAI-style servers do
        err = _input_error(e)
        yield _sse(_error_body(err.message, err.type, err.param, err.code))
        yield _sse(b"[DONE]")
        return
    finally:
        await chunks.aclose()
    yield _sse(_chunk(rid, created, model, {}, finish or "stop"))
    if req.include_usage:
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": _usage(usage)})
    yield _sse(b"[DONE]")


def run(chat_model: Any, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
        log_level: str = "info") -> None:
    """Serve a loaded ChatModel until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(create_app(chat_model, settings), host=host, port=port, log_level=log_level)
