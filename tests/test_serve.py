"""The OpenAI-compatible server end to end: a real uvicorn on 127.0.0.1 (free port, background thread) serving a
tiny random-weight checkpoint saved in the released layout, real HTTP requests with httpx.

Oracles: the same conversation sent straight to `ChatModel.chat` (the server must add nothing and lose nothing),
visual-token counts derived by hand from the tiny config (query_num 8, 224-px views, videos sampled at 5 fps),
and the tokenizer's own encoding of the two think-block prefills."""

import base64
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import asyncio

import pytest
import torch
from PIL import Image

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from media import write_video  # noqa: E402
from vlmcook.checkpoint import save_model  # noqa: E402
from vlmcook.config import PRESETS  # noqa: E402
from vlmcook.data.chat import EMPTY_THINK  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402
from vlmcook.infer.api import ChatModel  # noqa: E402
from test_engine import Recording  # noqa: E402
from vlmcook.infer.serve import QueueFull, ServeSettings, Worker, create_app  # noqa: E402
from vlmcook.model.minicpmv import MiniCPMV  # noqa: E402

Q = PRESETS["tiny"].query_num  # 8 visual tokens per view / video package


def png_bytes(size=(100, 80), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    img.paste((20, 20, 220), (10, 10, 50, 40))
    img.save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(n=10, fps=10) -> bytes:
    """1 s at 10 fps, 64x48: at the default 5 fps the sampler takes 5 frames."""
    pytest.importorskip("av")
    frames = [Image.new("RGB", (64, 48), (25 * i, 80, 160)) for i in range(n)]
    return write_video(None, frames, fps, codec="mpeg4", container="mp4")


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_model(MiniCPMV(PRESETS["tiny"]), root / "model", tokenizer=Tokenizer.tiny())
    media, outside = root / "media", root / "outside"
    media.mkdir()
    outside.mkdir()
    (media / "red.png").write_bytes(png_bytes())
    (media / "clip.mp4").write_bytes(mp4_bytes())
    (media / "truncated.png").write_bytes(png_bytes(size=(120, 90))[:200])
    (media / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    (outside / "secret.png").write_bytes(png_bytes())
    (media / "escape.png").symlink_to(outside / "secret.png")
    chat_model = ChatModel.load(root / "model")
    settings = ServeSettings(model_name="tiny", allowed_media_dir=media, max_request_mb=1.0, max_media_mb=0.25,
                             max_images=3, max_frames=8, max_rows=8, max_kv_tokens=20_000)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    app = create_app(chat_model, settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    port = sock.getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield type("Srv", (), dict(client=client, model=chat_model, app=app, media=media, outside=outside, port=port,
                                   settings=settings))
    server.should_exit = True
    thread.join(10)
    sock.close()


def post(srv, body, **kw):
    return srv.client.post("/v1/chat/completions", json=body, **kw)


def user(*parts):
    return [{"role": "user", "content": list(parts) if len(parts) > 1 or not isinstance(parts[0], str)
             else parts[0]}]


GREEDY = {"temperature": 0, "max_tokens": 6}


def direct(srv, messages, **kw):
    """The oracle: the same request straight through the Python API."""
    return srv.model.chat(messages, **{"temperature": 0, "max_new_tokens": 6, **kw})


def check_reply(r, expect):
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["model"] == "tiny"
    c = j["choices"][0]
    assert c["message"]["role"] == "assistant"
    assert c["message"]["content"] == expect.answer
    assert c["message"]["reasoning_content"] == (expect.reasoning or None)
    assert c["finish_reason"] == expect.finish_reason
    u = j["usage"]
    assert u["prompt_tokens"] == expect.usage.prompt_tokens
    assert u["completion_tokens"] == expect.usage.completion_tokens
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens_details"]["visual_tokens"] == expect.usage.visual_tokens
    return j


# ---- plain endpoints -------------------------------------------------------------------------------------------
def test_health_and_models(srv):
    assert srv.client.get("/health").json()["status"] == "ok"
    models = srv.client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == PRESETS["tiny"].llm.max_position_embeddings
    r = srv.client.get("/v1/nope")
    assert r.status_code == 404 and "error" in r.json()


# ---- good requests -----------------------------------------------------------------------------------------------
def test_text(srv):
    j = check_reply(post(srv, {"model": "tiny", "messages": user("Hello there"), **GREEDY}),
                    direct(srv, user("Hello there")))
    assert j["usage"]["prompt_tokens_details"]["visual_tokens"] == 0


def test_image_data_url_and_local_files_agree(srv):
    png = png_bytes()
    expect = direct(srv, user({"type": "image", "image": Image.open(io.BytesIO(png))}, "What is this?"))
    assert expect.usage.visual_tokens == Q  # a 100x80 image is one 224-px view, not sliced
    for url in (data_url(png, "image/png"), "red.png", str(srv.media / "red.png"),
                (srv.media / "red.png").as_uri()):
        body = {"messages": user({"type": "image_url", "image_url": {"url": url}},
                                 {"type": "text", "text": "What is this?"}), **GREEDY}
        check_reply(post(srv, body), expect)


def test_video_packing_knobs(srv):
    video = mp4_bytes()
    for packing, packages in ((None, 5), (2, 3), (5, 1)):  # 5 frames at 5 fps -> ceil(5 / packing) packages
        knobs = {} if packing is None else {"video_packing": packing}
        expect = direct(srv, user({"type": "video", "video": video}, "What happens?"), packing=packing)
        assert expect.usage.visual_tokens == packages * Q
        for part in ({"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}},
                     {"type": "video", "video": "clip.mp4"}):
            check_reply(post(srv, {"messages": user(part, "What happens?"), **GREEDY, **knobs}), expect)
    # video_max_frames / video_fps reach the sampler: 2 frames -> 2 packages
    r = post(srv, {"messages": user({"type": "video", "video": "clip.mp4"}, "?"), "video_max_frames": 2, **GREEDY})
    assert r.json()["usage"]["prompt_tokens_details"]["visual_tokens"] == 2 * Q


def test_thinking_fields(srv):
    tok = Tokenizer.tiny()
    extra = len(tok.encode(EMPTY_THINK)) - len(tok.encode("<think>\n"))  # the short-mode prefill is longer
    msgs = user("Think about it.")
    off = post(srv, {"messages": msgs, **GREEDY}).json()
    off2 = post(srv, {"messages": msgs, "enable_thinking": False, **GREEDY}).json()
    budget = {"messages": msgs, "thinking_budget": 2, **GREEDY}
    on = post(srv, {**budget, "enable_thinking": True}).json()
    on2 = post(srv, {**budget, "chat_template_kwargs": {"enable_thinking": True}}).json()
    assert off["usage"]["prompt_tokens"] - on["usage"]["prompt_tokens"] == extra
    assert off == {**off2, "id": off["id"], "created": off["created"], "timings": off["timings"]}
    assert on["choices"] == on2["choices"]
    expect = direct(srv, msgs, thinking=True, think_budget=2)
    assert on["choices"][0]["message"]["content"] == expect.answer
    assert on["choices"][0]["message"]["reasoning_content"] == (expect.reasoning or None)
    r = post(srv, {**budget, "enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "enable_thinking"


def sse_events(r) -> list:
    events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("thinking", [False, True])
def test_streaming_equals_non_streaming(srv, thinking):
    png = data_url(png_bytes(), "image/png")
    body = {"messages": user({"type": "image_url", "image_url": {"url": png}}, "Describe."), "seed": 3,
            "temperature": 0.9, "max_tokens": 8, "enable_thinking": thinking}
    if thinking:
        body["thinking_budget"] = 3
    full = post(srv, body).json()
    with srv.client.stream("POST", "/v1/chat/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    msg = full["choices"][0]["message"]
    assert "".join(d.get("content", "") for d in deltas) == msg["content"]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == (msg["reasoning_content"] or "")
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == full["choices"][0]["finish_reason"] and not any(finishes[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]


def test_concurrent_requests_match_sequential(srv):
    bodies = [{"messages": user(f"question number {i}"), "seed": 10 + i, "temperature": 1.0, "max_tokens": 6}
              for i in range(4)]
    bodies.append({"messages": user({"type": "video", "video": "clip.mp4"}, "and this?"), **GREEDY})
    one_by_one = [post(srv, b).json()["choices"] for b in bodies]
    with recorded(srv) as rec, ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(srv, b).json()["choices"], bodies))
    assert together == one_by_one
    assert max(rows for kind, rows, _ in rec.calls if kind == "decode") >= 2  # they did share a batch
    assert len({c[0]["message"]["content"] for c in one_by_one[:4]}) > 1  # the seeds matter: not one answer


def test_multi_turn_keeps_reasoning_field(srv):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
            {"role": "user", "content": "Again"}]
    check_reply(post(srv, {"messages": msgs, "user": "someone", **GREEDY}), direct(srv, msgs))


# ---- bad input: each a 4xx in OpenAI's error shape, and the server keeps serving -----------------------------------
def img(url):
    return user({"type": "image_url", "image_url": {"url": url}}, "?")


BAD = {
    "malformed json": (b'{"messages": [', 400, "malformed JSON"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "unknown field": ({"messages": user("hi"), "frobnicate": 1}, 400, "frobnicate"),
    "behaviour-changing field": ({"messages": user("hi"), "stop": ["x"]}, 400, "stop=['x']"),
    "more choices than rows": ({"messages": user("hi"), "n": 9}, 400, "n=9 is more than the 8 rows"),
    "over the KV budget": ({"messages": user("hi"), "n": 8, "max_tokens": 3000}, 400, "max_kv_tokens"),
    "bad role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "bad content": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "bad part type": ({"messages": user({"type": "audio_url"}, "x")}, 400, "audio_url"),
    "bad temperature": ({"messages": user("hi"), "temperature": "hot"}, 400, "temperature"),
    "bad top_p": ({"messages": user("hi"), "top_p": 0}, 400, "top_p"),
    "wrong model": ({"model": "gpt-4o", "messages": user("hi")}, 404, "gpt-4o"),
    "missing file": ({"messages": img("nope.png")}, 400, "no such file"),
    "outside folder": ({"messages": img("../outside/secret.png")}, 403, "outside the allowed"),
    "absolute outside": ({"messages": img("/etc/hostname")}, 403, "outside the allowed"),
    "file url outside": ({"messages": img("file:///etc/hostname")}, 403, "outside the allowed"),
    "symlink escape": ({"messages": img("escape.png")}, 403, "outside the allowed"),
    "remote url": ({"messages": img("https://example.com/cat.png")}, 400, "remote URLs are not fetched"),
    "other scheme": ({"messages": img("ftp://x/y.png")}, 400, "scheme"),
    "bad base64": ({"messages": img("data:image/png;base64,@@@@")}, 400, "base64"),
    "media over limit": ({"messages": img(data_url(os.urandom(300_000), "image/png"))}, 413, "0.25 MB"),
    "body over limit": ({"messages": user("x" * 1_200_000)}, 413, "1 MB"),
    "too many images": ({"messages": user(*[{"type": "image_url", "image_url": {"url": "red.png"}}] * 4)}, 400,
                        "more than 3 images"),
    "too many frames": ({"messages": user({"type": "video", "video": "clip.mp4"}, "?"), "video_max_frames": 9},
                        400, "video_max_frames=9"),
    "corrupt image": ({"messages": img(data_url(b"not an image at all", "image/png"))}, 400, "image"),
    "truncated image": ({"messages": img("truncated.png")}, 400, "truncated.png"),
    "corrupt video": ({"messages": user({"type": "video", "video": "corrupt.mp4"}, "?")}, 400, "corrupt.mp4"),
    "prompt over context": ({"messages": user("word " * 5000)}, 400, "maximum context length is 4096"),
    "budget without thinking": ({"messages": user("hi"), "thinking_budget": 3}, 400, "thinking_budget"),
    "max_tokens over context": ({"messages": user("hi"), "max_tokens": 5000}, 400, "5000 completion tokens"),
    "last message from assistant": ({"messages": [{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]}, 400, "last message"),
}


# with stream=true too: errors found while the worker preprocesses (pixel decoding) must still be a plain 4xx
STREAM_BAD = ["unknown field", "missing file", "corrupt image", "truncated image", "corrupt video",
              "prompt over context"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_inputs_get_4xx_and_server_keeps_serving(srv, stream):
    good = {"messages": user("still there?"), "temperature": 0, "max_tokens": 2}
    expect = post(srv, good).json()["choices"]
    for name, (body, status, needle) in BAD.items():
        if stream and name not in STREAM_BAD:
            continue
        if isinstance(body, bytes):
            r = srv.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = post(srv, {**body, "stream": stream})
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, name
        assert needle in err["message"] or needle == err["param"], (name, err)
        assert post(srv, good).json()["choices"] == expect, f"server broken after {name}"


def test_ignored_and_noop_fields_are_accepted(srv):
    body = {"messages": user("hi"), "user": "u1", "n": 1, "stop": None, "presence_penalty": 0, "logprobs": False,
            "response_format": {"type": "text"}, "max_completion_tokens": 6, "temperature": 0}
    check_reply(post(srv, body), direct(srv, user("hi")))


@contextmanager
def recorded(srv, delay=0.005):
    """The forwards the server's engine runs meanwhile (test_engine.Recording), each slowed by `delay`."""
    engine = srv.model.engine
    engine.model = rec = Recording(engine.model, delay)
    try:
        yield rec
    finally:
        engine.model = rec.model


def wait_health(srv, done, timeout=20.0) -> dict:
    deadline = time.time() + timeout
    while not done(h := srv.client.get("/health").json()) and time.time() < deadline:
        time.sleep(0.01)
    return h


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_client_gone_its_row_leaves_at_the_next_step(srv, stream):
    """A client that hangs up (streaming, or waiting for a plain reply) while its request generates takes its row
    out of the batch at once, not ~1000 tokens later, while a request beside it runs on to its answer alone."""
    body = json.dumps({"messages": user("go on"), "stream": stream, "max_tokens": 2000, "temperature": 1.0,
                       "seed": 3, "repetition_penalty": 1.0}).encode()  # seed 3: 1051 tokens before a stop token
    beside = {"messages": user("still there?"), "seed": 5, "temperature": 1.0, "max_tokens": 30}
    before = srv.client.get("/health").json()["cancelled_requests"]
    with recorded(srv) as rec, ThreadPoolExecutor(1) as pool:
        conn = socket.create_connection(("127.0.0.1", srv.port))
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_health(srv, lambda h: h["running_rows"] == 1)  # it generates
        other = pool.submit(post, srv, beside)
        wait_health(srv, lambda h: h["running_rows"] == 2)  # side by side
        conn.close()  # hang up
        gone_at = len(rec.calls)
        reply = other.result(30)
        health = wait_health(srv, lambda h: h["running_rows"] == 0 and h["cancelled_requests"] > before)
        steps_after = sum(kind == "decode" for kind, *_ in rec.calls[gone_at:])
    assert (health["cancelled_requests"], health["running_rows"]) == (before + 1, 0)
    assert steps_after < 60  # the beside request's (at most 30) and the gone row's last few, not ~1000
    assert reply.json()["choices"][0]["message"]["content"] == \
        direct(srv, beside["messages"], seed=5, temperature=1.0, max_new_tokens=30).answer


def test_n_choices_share_one_prefill(srv):
    body = {"messages": user({"type": "image_url", "image_url": {"url": "red.png"}}, "Describe."), "n": 3,
            "seed": 4, "temperature": 1.0, "max_tokens": 8}
    with recorded(srv, delay=0) as rec:
        j = post(srv, body).json()
    assert [c[:2] for c in rec.calls if c[0] == "prefill"] == [("prefill", 1)]
    expect = srv.model.chat(user({"type": "image", "image": str(srv.media / "red.png")}, "Describe."), n=3, seed=4,
                            temperature=1.0, max_new_tokens=8)
    assert [c["index"] for c in j["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in j["choices"]] == [r.answer for r in expect]
    assert len({r.answer for r in expect}) == 3  # different samples, not one answer three times
    assert j["usage"]["prompt_tokens"] == expect[0].usage.prompt_tokens
    assert j["usage"]["completion_tokens"] == sum(r.usage.completion_tokens for r in expect)
    with srv.client.stream("POST", "/v1/chat/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    for i, choice in enumerate(j["choices"]):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice["finish_reason"]]
    assert events[-1]["usage"] == j["usage"]


def test_worker_runs_jobs_side_by_side_up_to_its_limit():
    """Each job runs on its own thread (the engine batches their generations), at most `limit` at once."""
    worker, barrier, release = Worker(3), threading.Barrier(3, timeout=10), threading.Event()

    def job(i):
        barrier.wait()  # passes only when the three jobs run at the same time
        yield i
        release.wait(10)

    async def main():
        async def one(i):
            return [x async for x in worker.stream(lambda: job(i))]

        tasks = [asyncio.create_task(one(i)) for i in range(3)]
        while worker.active < 3:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="3 requests are in progress"):
            worker.admit()
        release.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [[0], [1], [2]]
