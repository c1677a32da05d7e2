"""The server's boundary, in process (FastAPI's TestClient / httpx over ASGI): what reaches ChatModel.chat, how its
exceptions become HTTP errors, unknown keys at any depth, server paths never echoed, sampling bounds, the bounded
queue. A stub stands in for ChatModel where the model's output does not matter; the tiny random model where it
does (media errors, sampling)."""

import asyncio
import base64
import io
import threading
from types import SimpleNamespace

import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from vlmcook.config import PRESETS  # noqa: E402
from vlmcook.data import processor  # noqa: E402
from vlmcook.data.image import ImageError  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402
from vlmcook.infer.api import ChatChunk, ChatModel, ChatResult, Timings, Usage  # noqa: E402
from vlmcook.infer.engine import MIN_TEMPERATURE, PENALTY_RANGE, Limits  # noqa: E402
from vlmcook.infer.serve import ServeSettings, create_app  # noqa: E402
from vlmcook.model.minicpmv import MiniCPMV  # noqa: E402

URL = "/v1/chat/completions"
USAGE = Usage(prompt_tokens=5, visual_tokens=0, completion_tokens=1, total_tokens=6)
RESULT = ChatResult("ok", "", "ok", "stop", USAGE, Timings(0.0, 0.0, 0.0))


class Stub:
    """ChatModel's surface as the server uses it (streamed chat, the engine's limits and load): records each call,
    then runs `then` (raise, block, ...)."""

    def __init__(self, then=None, stream_then=None):
        self.engine = SimpleNamespace(context_length=4096, limits=Limits(max_rows=4, max_queue=4, max_kv_tokens=10**6),
                                      load=lambda: {"running_rows": 0, "waiting": 0})
        self.model = SimpleNamespace(config=PRESETS["tiny"])  # max_slice_nums 4
        self.calls, self.then, self.stream_then = [], then, stream_then

    def chat(self, messages, stream=False, **kw):
        assert stream, "the server streams every request (to notice a client that goes away)"
        self.calls.append((messages, kw))
        if self.then:
            self.then()

        def chunks():
            yield ChatChunk("o", answer="o")
            if self.stream_then:
                self.stream_then()
            yield ChatChunk("k", answer="k", finish_reason="stop", usage=USAGE, result=RESULT)
        return chunks()


def client(model, **settings) -> TestClient:
    return TestClient(create_app(model, ServeSettings(model_name="m", **settings)), raise_server_exceptions=False)


def png(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


HI = [{"role": "user", "content": "hi"}]


# ---- what reaches ChatModel.chat -------------------------------------------------------------------------------
def test_request_reaches_chat_in_the_processor_format():
    stub = Stub()
    data = png()
    body = {"messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "image_url", "image_url": {
                             "url": "data:image/png;base64," + base64.b64encode(data).decode(), "detail": "low"}},
                             "What is it?", {"type": "text", "text": "Short."}], "name": "ann"}],
            "top_k": -1, "seed": 7, "video_packing": 2, "chat_template_kwargs": {"enable_thinking": True}}
    assert client(stub, max_frames=12).post(URL, json=body).status_code == 200
    messages, kw = stub.calls[-1]
    assert messages == [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                        {"role": "user", "content": [{"type": "image", "image": data},
                                                     {"type": "text", "text": "What is it?"},
                                                     {"type": "text", "text": "Short."}]}]
    # max_tokens absent: ChatModel's own default; top_k -1 = off (0 in the engine), not the preset's 100;
    # video frames default to the server's ceiling
    assert kw == dict(thinking=True, max_new_tokens=None, temperature=None, top_p=None, top_k=0,
                      repetition_penalty=None, seed=7, think_budget=None, max_slice_nums=None, fps=None, packing=2,
                      max_frames=12, max_visual_tokens=None, n=1)


# ---- unknown keys, wrong types ----------------------------------------------------------------------------------
VIDEO = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}


@pytest.mark.parametrize("body, param", [
    ({"messages": HI, "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": ["hi", {**VIDEO, "video_url": {"url": "x", "fps": 2}}]}]},
     "messages[0].content[1].video_url.fps"),
    ({"messages": [{"role": "user", "content": [{**VIDEO, "fps": 2}]}]}, "messages[0].content[0].fps"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}]},
     "messages[0].content[0].cache_control"),
    ({"messages": HI, "stream_options": {"include_usage": True, "chunk": 1}}, "stream_options.chunk"),
    ({"messages": HI, "chat_template_kwargs": {"add_vision_id": True}}, "chat_template_kwargs.add_vision_id"),
])
def test_unknown_keys_anywhere_are_named(body, param):
    stub = Stub()
    err = error_of(client(stub).post(URL, json=body), 400)
    assert (err["param"], err["code"]) == (param, "unknown_field") and repr(param) in err["message"]
    assert not stub.calls


@pytest.mark.parametrize("body, param", [
    ({"messages": HI, "stream": "yes"}, "stream"),
    ({"messages": HI, "max_tokens": 6.5}, "max_tokens"),
    ({"messages": HI, "max_tokens": "6"}, "max_tokens"),
    ({"messages": HI, "logprobs": True}, "logprobs"),
    ({"messages": HI, "video_fps": 10.5}, "video_fps"),
    ({"messages": HI, "video_packing": 7}, "video_packing"),
    ({"messages": HI, "max_slice_nums": 5}, "max_slice_nums"),  # the tiny config's max_slice_nums is 4
    ({"messages": HI, "max_tokens": 3, "max_completion_tokens": 3}, "max_tokens"),
    ({"messages": [{"role": "system", "content": [VIDEO]}, *HI]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a", "reasoning_content": "b"}]}, "messages[0].reasoning_content"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
])
def test_wrong_values_are_named(body, param):
    stub = Stub()
    assert error_of(client(stub).post(URL, json=body), 400)["param"] == param
    assert not stub.calls


def test_non_finite_json_numbers_are_refused():
    body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    r = client(Stub()).post(URL, content=body, headers={"content-type": "application/json"})
    assert error_of(r, 400)["param"] == "temperature"


# ---- exceptions from ChatModel.chat -> HTTP ---------------------------------------------------------------------
def raises(e):
    def then():
        raise e
    return then


@pytest.mark.parametrize("stream", [False, True])
def test_chat_exceptions_map_to_http_errors(stream):
    cases = [(ValueError("bad knob"), 400, "invalid_input", "bad knob"),
             (ImageError("message 0 item 0: corrupt"), 400, "invalid_input", "corrupt"),
             (processor.ContextLengthError(5000, 4096, 100), 400, "context_length_exceeded",
              "maximum context length is 4096 tokens; the prompt is 5000 tokens and 100 completion tokens"),
             (RuntimeError("CUDA out of memory at /srv/models/secret"), 500, "internal_error", "RuntimeError")]
    for exc, status, code, needle in cases:
        c = client(Stub(then=raises(exc)))
        err = error_of(c.post(URL, json={"messages": HI, "max_tokens": 100, "stream": stream}), status)
        assert err["code"] == code and needle in err["message"], err
        assert "/srv/models" not in err["message"]
        assert err["param"] == ("messages" if status == 400 else None)


def test_error_in_the_middle_of_a_stream_is_an_event():
    c = client(Stub(stream_then=raises(RuntimeError("boom"))))
    with c.stream("POST", URL, json={"messages": HI, "stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"code": "internal_error"' in events[-2] and "boom" not in events[-2]


# ---- the queue --------------------------------------------------------------------------------------------------
def test_full_queue_gets_429_with_retry_after():
    gate = threading.Event()
    stub = Stub(then=lambda: gate.wait(10))
    app = create_app(stub, ServeSettings(model_name="m", max_rows=1, max_queue=1))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            running = [asyncio.create_task(c.post(URL, json={"messages": HI})) for _ in range(2)]
            while (await c.get("/health")).json()["requests"] < 2:  # one row's worth running, one waiting
                await asyncio.sleep(0.01)
            full = await c.post(URL, json={"messages": HI})
            gate.set()
            done = await asyncio.gather(*running)
            return full, done, await c.post(URL, json={"messages": HI})

    full, done, after = asyncio.run(main())
    err = error_of(full, 429)
    assert full.headers["retry-after"] == "1" and err["code"] == "queue_full"
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert len(stub.calls) == 3  # the refused request never reached the model


# ---- the tiny model: media errors, sampling bounds ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "sub").mkdir()
    (root / "sub" / "truncated.png").write_bytes(png((120, 90))[:200])
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (root / "link.png").symlink_to(root / "sub" / "truncated.png")
    model = ChatModel(MiniCPMV(PRESETS["tiny"]), Tokenizer.tiny())
    return SimpleNamespace(client=client(model, allowed_media_dir=root), root=root, model=model)


def media(part_type: str, url: str) -> list:
    return [{"role": "user", "content": [{"type": part_type, part_type: {"url": url}}, "?"]}]


@pytest.mark.parametrize("part_type, url", [("image_url", "sub/truncated.png"), ("image_url", "link.png"),
                                            ("image_url", "sub/../sub/truncated.png"), ("video_url", "corrupt.mp4"),
                                            ("video_url", "file:corrupt.mp4"), ("image_url", "nope/x.png"),
                                            ("image_url", "../elsewhere.png")])
def test_errors_name_the_path_the_client_sent(tiny, part_type, url):
    r = tiny.client.post(URL, json={"messages": media(part_type, url), "max_tokens": 2})
    err = error_of(r, 403 if "elsewhere" in url else 400)
    assert str(tiny.root) not in r.text and url in err["message"], err


def test_odd_paths_are_400s(tiny):
    for url in ("a\x00b.png", "file://otherhost/x.png", "ftp://x/y.png", "data:image/png,rawbytes"):
        err = error_of(tiny.client.post(URL, json={"messages": media("image_url", url)}), 400)
        assert err["param"] == "messages[0].content[0].image_url.url", err


def test_settings_refuse_limits_that_cannot_work():
    for bad in (dict(max_queue=-1), dict(max_queue=0), dict(max_rows=0), dict(max_kv_tokens=0), dict(max_frames=0),
                dict(max_media_mb=0), dict(max_images=-1)):
        with pytest.raises(ValueError, match=next(iter(bad)).replace("_", "-")):
            ServeSettings(**bad)
    ServeSettings(max_rows=1, max_queue=1, max_images=0, max_videos=0)  # one request at a time, text only: allowed


@pytest.mark.parametrize("field, value", [("temperature", 1e-30), ("temperature", 1e-45), ("temperature", 5e-324),
                                          ("temperature", MIN_TEMPERATURE / 2), ("repetition_penalty", 1e300),
                                          ("repetition_penalty", 1e-300), ("repetition_penalty", 0),
                                          ("top_p", 0), ("top_k", -2)])
def test_sampling_values_that_overflow_are_refused(tiny, field, value):
    err = error_of(tiny.client.post(URL, json={"messages": HI, field: value, "max_tokens": 2}), 400)
    assert err["param"] == field


@pytest.mark.parametrize("penalty", PENALTY_RANGE)
def test_sampling_at_the_bounds_generates(tiny, penalty):
    """The most extreme accepted values: a full answer, plain and streamed, never an error (the bounds are safe)."""
    body = {"messages": HI, "temperature": MIN_TEMPERATURE, "repetition_penalty": penalty, "top_p": 1e-30,
            "top_k": 10**9, "seed": 3, "max_tokens": 12}
    plain = tiny.client.post(URL, json=body)
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] >= 1
    with tiny.client.stream("POST", URL, json={**body, "stream": True, "temperature": 2.0}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)


def test_top_k_minus_one_means_no_top_k(tiny):
    body = {"messages": HI, "temperature": 1.0, "seed": 5, "max_tokens": 12, "top_k": -1}
    got = tiny.client.post(URL, json=body).json()["choices"][0]["message"]["content"]
    assert got == tiny.model.chat(HI, temperature=1.0, seed=5, max_new_tokens=12, top_k=0).answer
