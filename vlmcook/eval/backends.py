"""Where `vlmcook eval` gets answers: the vlmcook model in this process (batched with `ChatModel.chat_batch`), or
any OpenAI-compatible `/v1/chat/completions` endpoint (a batch = that many concurrent requests).

Notable:
- Both get the same messages and the same decoding: greedy by default, repetition_penalty 1.0 (sent explicitly:
  servers differ in their defaults), thinking on/off as `chat_template_kwargs.enable_thinking` (read by vLLM,
  SGLang and `vlmcook serve`), max tokens, and a per-sample seed.
- A failed request is that sample's error (recorded and counted), never the end of the run: a model batch that
  raises is re-run one request at a time so only the bad sample fails. An endpoint that cannot be reached at all
  stops the run (`EndpointUnreachable`; rerunning with the same --out resumes).
- Endpoint timings are client wall clock over a streamed reply: prefill = until the first token (upload, queueing
  and the server's preprocessing included), decode = the rest. The server's memory is not visible from here.
- Video knobs reach an endpoint as video_fps / video_max_frames / video_packing / video_max_visual_tokens, and only
  when a probe request carrying them is not refused as unknown fields (`knobs_note` says what happened). A server
  that silently ignores unknown fields "accepts" them: the visual-token counts in the report show whether they
  took effect.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vlmcook.eval.tasks.common import SampleError
from vlmcook.data.processor import VIDEO_KNOBS

GEN_ERRORS = (ValueError, OSError, RuntimeError)  # bad media, too long, out of memory: one sample's problem


@dataclass(frozen=True)
class Gen:
    """Decoding settings of a run (the same for every sample)."""

    thinking: bool = False
    max_new_tokens: int = 64
    temperature: float = 0.0
    knobs: dict = field(default_factory=dict)  # video knobs given on the command line (fps, packing, ...)


@dataclass
class Output:
    answer: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # visual slots included
    visual_tokens: int | None = None
    completion_tokens: int | None = None
    preprocess_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    error: str | None = None


def peak_memory(device=None) -> dict:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes) and CUDA peak allocated."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_peak_rss_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device is not None and device.type == "cuda":
        import torch

        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


# ---- the vlmcook model -------------------------------------------------------------------------------------------
class ModelBackend:
    def __init__(self, chat_model, gen: Gen, folder: str):
        self.chat_model, self.gen = chat_model, gen
        self.device = next(chat_model.model.parameters()).device
        self.describe = {"kind": "model", "model": str(Path(folder).resolve()), "device": str(self.device)}
        self.knobs_note = "applied by the model"
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def _request(self, messages: list[dict], seed: int) -> dict:
        g = self.gen
        return {"messages": messages, "seed": seed, "thinking": g.thinking, "max_new_tokens": g.max_new_tokens,
                "temperature": g.temperature, "repetition_penalty": 1.0, **g.knobs}

    def generate(self, requests: list[tuple[list[dict], int]]) -> list[Output]:
        try:
            results = self.chat_model.chat_batch([self._request(m, s) for m, s in requests])
        except GEN_ERRORS as e:
            if len(requests) == 1:
                return [Output(error=f"{type(e).__name__}: {e}")]
            return [self.generate([r])[0] for r in requests]  # find the bad one(s); the rest still get answers
        out = []
        for r in results:
            u, t = r.usage, r.timings
            out.append(Output(r.answer, r.reasoning, r.finish_reason, u.prompt_tokens, u.visual_tokens,
                              u.completion_tokens, t.preprocess_s, t.prefill_s, t.decode_s))
        return out

    def memory(self) -> dict:
        return peak_memory(self.device)


# ---- an OpenAI-compatible endpoint ---------------------------------------------------------------------------------
class EndpointUnreachable(ConnectionError):
    pass


def api_base(url: str) -> str:
    """http://host:8000, .../v1 or .../v1/chat/completions -> http://host:8000/v1."""
    url = url.rstrip("/")
    for tail in ("/chat/completions", "/v1"):
        if url.endswith(tail):
            url = url[: -len(tail)]
    return url + "/v1"


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_mime(data: bytes) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.MIME.get(Image.open(io.BytesIO(data)).format, "image/png")
    except (UnidentifiedImageError, OSError):
        return "image/png"  # not an image: the server answers 400 and the sample records it


def _media_url(src, kind: str, send_paths: bool) -> str:
    from PIL import Image

    if isinstance(src, Image.Image):
        buf = io.BytesIO()
        src.save(buf, format="PNG")
        return _data_url(buf.getvalue(), "image/png")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return _data_url(data, _image_mime(data) if kind == "image" else "video/mp4")
    path = Path(src)
    if not path.is_file():
        raise SampleError(f"{kind} {path}: no such file")
    if send_paths:
        return path.resolve().as_uri()
    data = path.read_bytes()
    mime = _image_mime(data) if kind == "image" else (mimetypes.guess_type(path.name)[0] or "video/mp4")
    return _data_url(data, mime)


class EndpointBackend:
    def __init__(self, url: str, gen: Gen, model_name: str | None = None, send_paths: bool = False,
                 timeout_s: float = 3600.0, client=None):
        import httpx

        self.httpx, self.gen, self.send_paths = httpx, gen, send_paths
        self.base = api_base(url)
        self.client = client or httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.model_name = model_name or self._first_model()
        self.send_knobs, self.knobs_note = self._probe()
        self.describe = {"kind": "endpoint", "endpoint": self.base, "served_model": self.model_name}

    def _first_model(self) -> str:
        try:
            r = self.client.get(f"{self.base}/models")
        except self.httpx.HTTPError as e:
            raise EndpointUnreachable(f"--endpoint: cannot reach {self.base}/models ({e})") from None
        try:
            models = (r.json().get("data") or []) if r.status_code == 200 else []
        except (ValueError, AttributeError):  # not the OpenAI /models shape
            models = []
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise ValueError(f"--endpoint: {self.base}/models gave no model id (HTTP {r.status_code}); pass "
                             f"--endpoint-model NAME")
        return str(models[0]["id"])

    def _knob_fields(self, knobs: dict) -> dict:
        return {f"video_{k}": v for k, v in knobs.items() if v is not None}

    def _probe(self) -> tuple[bool, str]:
        """One tiny request (with our video knobs when some are set): reachable, fields accepted?"""
        fields = self._knob_fields(self.gen.knobs)
        status, msg = self._tiny(fields)
        if status == 200:
            return bool(fields), "sent" if fields else "none given"
        low = msg.lower()
        refused = fields and any(k in msg for k in fields) and any(
            w in low for w in ("unknown", "unrecognized", "extra", "not permitted", "unexpected"))
        if not refused:
            raise ValueError(f"--endpoint: the probe request was refused: HTTP {status}: {msg}")
        status, msg = self._tiny({})
        if status != 200:
            raise ValueError(f"--endpoint: the probe request was refused: HTTP {status}: {msg}")
        print(f"vlmcook eval: the endpoint refused the video knobs ({sorted(fields)}); sending none",
              file=sys.stderr)
        return False, f"refused by the endpoint, not sent: {msg[:200]}"

    def _tiny(self, extra: dict) -> tuple[int, str]:
        """A one-token request shaped like the real ones (streamed, with usage), plus `extra` fields."""
        body = {**self._common(0, 1), "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                "stream_options": {"include_usage": True}, **extra}
        try:
            r = self.client.post(f"{self.base}/chat/completions", json=body)
        except self.httpx.HTTPError as e:
            raise EndpointUnreachable(f"--endpoint: cannot reach {self.base}/chat/completions ({e})") from None
        return r.status_code, _error_message(r.text)

    def _common(self, seed: int, max_tokens: int) -> dict:
        g = self.gen
        return {"model": self.model_name, "max_tokens": max_tokens, "temperature": g.temperature, "seed": seed,
                "repetition_penalty": 1.0, "chat_template_kwargs": {"enable_thinking": g.thinking}}

    def _body(self, messages: list[dict], seed: int) -> dict:
        knobs, out = dict(self.gen.knobs), []
        item_knobs: list[dict] = []
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                out.append({"role": m["role"], "content": content})
                continue
            parts = []
            for it in content:
                if isinstance(it, str):
                    parts.append({"type": "text", "text": it})
                elif it.get("type") == "text":
                    parts.append({"type": "text", "text": it["text"]})
                elif it.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": _media_url(it["image"], "image",
                                                                                       self.send_paths)}})
                elif it.get("type") == "video":
                    extra = set(it) - {"type", "video", *VIDEO_KNOBS}
                    if extra:
                        raise SampleError(f"video keys {sorted(extra)} cannot be sent to an endpoint")
                    item_knobs.append({k: it[k] for k in VIDEO_KNOBS if it.get(k) is not None})
                    parts.append({"type": "video_url", "video_url": {"url": _media_url(it["video"], "video",
                                                                                       self.send_paths)}})
            out.append({"role": m["role"], "content": parts})
        for k in item_knobs:  # a record's own video knobs win over the command line's, as in ChatModel
            if k != item_knobs[0]:
                raise SampleError("videos of one sample with different knobs: an endpoint takes one set")
            if k and not self.send_knobs:
                raise SampleError(f"the sample sets video knobs {k} but the endpoint refused video knobs")
            knobs.update(k)
        fields = self._knob_fields(knobs) if self.send_knobs else {}
        return {**self._common(seed, self.gen.max_new_tokens), "messages": out, "stream": True,
                "stream_options": {"include_usage": True}, **fields}

    def _one(self, messages: list[dict], seed: int) -> Output:
        try:
            body = self._body(messages, seed)
        except SampleError as e:
            return Output(error=str(e))
        t0, first, out = time.perf_counter(), None, Output()
        try:
            with self.client.stream("POST", f"{self.base}/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return Output(error=f"HTTP {r.status_code}: {_error_message(r.read().decode(errors='replace'))}")
                for line in r.iter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("error"):  # a server may report a failure inside the stream
                        return Output(error=f"stream error: {_error_message(json.dumps(chunk))}")
                    if _add_chunk(out, chunk) and first is None:
                        first = time.perf_counter()
        except self.httpx.ConnectError as e:
            raise EndpointUnreachable(f"--endpoint: lost {self.base} ({e}); rerun with the same --out to resume") \
                from None
        except (self.httpx.HTTPError, json.JSONDecodeError) as e:
            return Output(error=f"{type(e).__name__}: {e}")
        end = time.perf_counter()
        out.prefill_s = (first or end) - t0
        out.decode_s = end - (first or end)
        return out

    def generate(self, requests: list[tuple[list[dict], int]]) -> list[Output]:
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            return list(pool.map(lambda r: self._one(*r), requests))

    def memory(self) -> dict:
        return {"server": "not visible to the client"}


def _add_chunk(out: Output, chunk: dict) -> bool:
    """Fold one streamed chunk into `out`; True when it carried generated text."""
    usage = chunk.get("usage")
    if usage:
        out.prompt_tokens, out.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        out.visual_tokens = (usage.get("prompt_tokens_details") or {}).get("visual_tokens")
    got = False
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        r = delta.get("reasoning_content") or delta.get("reasoning") or ""
        a = delta.get("content") or ""
        out.reasoning += r
        out.answer += a
        got = got or bool(r or a)
        out.finish_reason = choice.get("finish_reason") or out.finish_reason
    return got


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        return str(err.get("message") if isinstance(err, dict) else err or text)[:500]
    except (json.JSONDecodeError, AttributeError):
        return text[:500]
