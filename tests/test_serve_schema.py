"""Properties of the server's request schema, with hypothesis, against the tiny random model in process:
- any JSON body (random, or a valid request with random edits) gets a 200 or a 4xx in OpenAI's error shape, never
  a 500 or an error event in a stream;
- an unknown key put anywhere in a valid request is a 400 whose `param` is that key's path;
- any sampling values: a 200 or a 400 naming the field, never inf/nan inside the model.
Generation is kept to a few tokens (max_tokens is always given) so each example takes milliseconds."""

import base64
import io
import json

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from vlmcook.config import PRESETS  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402
from vlmcook.infer.api import ChatModel  # noqa: E402
from vlmcook.infer.serve import (ChatRequest, MediaURL, Message, Part, ServeSettings, StreamOptions,  # noqa: E402
                                  TemplateKwargs, create_app)
from vlmcook.model.minicpmv import MiniCPMV  # noqa: E402

URL = "/v1/chat/completions"
_buf = io.BytesIO()
Image.new("RGB", (30, 20), (10, 200, 30)).save(_buf, format="PNG")
PNG = "data:image/png;base64," + base64.b64encode(_buf.getvalue()).decode()
DECLARED = {k for m in (ChatRequest, Message, Part, MediaURL, StreamOptions, TemplateKwargs) for k in m.model_fields}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "a.txt").write_text("not an image")
    model = ChatModel(MiniCPMV(PRESETS["tiny"]), Tokenizer.tiny())
    app = create_app(model, ServeSettings(model_name="tiny", allowed_media_dir=media, max_request_mb=0.5))
    return TestClient(app, raise_server_exceptions=False)


def post(client, body):
    """-> (status, parsed reply or SSE events); checks the reply's shape."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with client.stream("POST", URL, content=raw, headers={"content-type": "application/json"}) as r:
        text = "".join(r.iter_text())
    assert r.status_code != 500, text
    if r.status_code != 200:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), text
        assert err["param"] is None or isinstance(err["param"], str)
        return r.status_code, err
    if not text.startswith("data: "):
        return 200, json.loads(text)
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), text
    return 200, events


def valid(stream: bool = False) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}},
                                                      {"type": "text", "text": "What is it?"}]}],
            "max_tokens": 2, "temperature": 0, "stream": stream, "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": False}}


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                           st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
FIELDS = sorted(set(ChatRequest.model_fields) - {"max_tokens", "max_completion_tokens"}) + ["role", "content",
                                                                                           "type", "url", "text"]


def nodes(obj, path=()):
    """Every dict and list in a JSON value, with its path."""
    if isinstance(obj, (dict, list)):
        yield path, obj
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from nodes(v, (*path, k))


@st.composite
def edited_requests(draw):
    """A valid request with a few random edits: a value replaced, a key (known name or random) set or removed.
    max_tokens stays small so no example generates for long."""
    body = valid(draw(st.booleans()))
    for _ in range(draw(st.integers(1, 3))):
        path, node = draw(st.sampled_from(list(nodes(body))))
        if isinstance(node, list):
            if node and draw(st.booleans()):
                node[draw(st.integers(0, len(node) - 1))] = draw(json_values)
            else:
                node.append(draw(json_values))
        elif node and draw(st.booleans()):
            node.pop(draw(st.sampled_from(sorted(node))))
        else:
            node[draw(st.sampled_from(FIELDS) | st.text(max_size=6))] = draw(json_values)
    body["max_tokens"] = 2
    body.pop("max_completion_tokens", None)
    return body


@SETTINGS
@given(body=st.one_of(json_values, edited_requests(), st.binary(max_size=40)))
def test_any_body_gets_200_or_a_shaped_4xx(client, body):
    post(client, body)


@SETTINGS
@given(data=st.data())
def test_unknown_key_at_any_depth_is_named(client, data):
    body = valid()
    path, node = data.draw(st.sampled_from([(p, n) for p, n in nodes(body) if isinstance(n, dict)]))
    key = data.draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
        lambda k: k not in DECLARED))
    node[key] = 1
    status, err = post(client, body)
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*path, key)).lstrip(".")
    assert status == 400 and err["param"] == where and err["code"] == "unknown_field", (where, err)


finite_or_not = st.floats() | st.integers(-10, 10**20)


@SETTINGS
@given(temperature=finite_or_not, top_p=finite_or_not, top_k=st.integers(-3, 10**12),
       penalty=finite_or_not, stream=st.booleans())
def test_sampling_values_never_break_generation(client, temperature, top_p, top_k, penalty, stream):
    body = {**valid(stream), "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "repetition_penalty": penalty, "seed": 0, "max_tokens": 3}
    status, reply = post(client, json.dumps(body).encode())  # NaN / Infinity go out as JSON's extension literals
    if status != 200:
        assert status == 400 and reply["param"] in ("temperature", "top_p", "top_k", "repetition_penalty"), reply
