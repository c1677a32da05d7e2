"""`vlmcook eval --endpoint` against `vlmcook serve` on loopback (a real uvicorn on 127.0.0.1, the tiny checkpoint):
the same task on both backends gives the same predictions and token counts (greedy), errors included; the video
knobs reach the server. A scripted transport plays a server that refuses unknown fields: the knobs are then not
sent, and the run says so."""

import json
import socket
import threading
import time

import httpx
import pytest

from test_eval_model import model_dir  # noqa: F401 - the module-scoped tiny checkpoint fixture
from test_eval_tasks import mcq_tsv, videomme_dir
from vlmcook.eval.backends import EndpointBackend, Gen
from vlmcook.eval.run import EvalConfig, run
from vlmcook.infer.api import ChatModel

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    from vlmcook.infer.serve import ServeSettings, create_app

    app = create_app(ChatModel.load(model_dir), ServeSettings(model_name="tiny"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


def _both(tmp_path, model_dir, server, **kw):  # noqa: F811
    """The same run on the model and on the endpoint -> (model records, endpoint records, endpoint scores)."""
    recs, scores = [], None
    for name, backend in (("model", {"model": str(model_dir)}), ("endpoint", {"endpoint": server})):
        scores = run(EvalConfig(out=str(tmp_path / name), batch_size=2, **backend, **kw), progress=False)
        recs.append([json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()])
    return recs[0], recs[1], scores


def _same(a, b):
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert (x["error"] is None) == (y["error"] is None), (x["error"], y["error"])
        assert (x["output"], x["extracted"], x["score"]) == (y["output"], y["extracted"], y["score"])
        if x["error"] is None:
            assert x["usage"] == y["usage"]


def test_mcq_same_predictions_on_both_backends(tmp_path, model_dir, server):  # noqa: F811
    data = mcq_tsv(tmp_path / "m.tsv")
    with open(data, "a") as f:  # base64 of bytes that are no image: the model raises, the server answers 400
        f.write(f"5\t{'bm90IGFuIGltYWdl' * 6}\tQ?\t\tx\ty\t\tA\tbroken\ttest\n")
    on_model, on_endpoint, scores = _both(tmp_path, model_dir, server, task="mcq", data=str(data),
                                          max_new_tokens=6)
    _same(on_model, on_endpoint)
    assert sum(r["error"] is not None for r in on_endpoint) == 3 and scores["errors"] == 3
    assert "HTTP 400" in next(r for r in on_endpoint if r["id"] == "5")["error"]
    ok = [r for r in on_endpoint if r["error"] is None]
    assert all(r["seconds"]["prefill"] > 0 and r["usage"]["visual_tokens"] > 0 for r in ok)
    assert scores["efficiency"]["peak_memory"] == {"server": "not visible to the client"}


def test_videomme_knobs_reach_the_server(tmp_path, model_dir, server):  # noqa: F811
    folder = videomme_dir(tmp_path / "vmme", "parquet")
    on_model, on_endpoint, scores = _both(tmp_path, model_dir, server, task="videomme", data=str(folder),
                                          video_packing=2, video_fps=6, max_new_tokens=3)
    _same(on_model, on_endpoint)
    assert next(r for r in on_endpoint if r["id"] == "001-1")["usage"]["visual_tokens"] == 3 * 8  # packing 2
    session = json.loads((tmp_path / "endpoint" / "run.json").read_text())["sessions"][0]
    assert session["video_knobs"] == "sent" and session["backend"]["served_model"] == "tiny"


# ---- a server that refuses unknown fields ------------------------------------------------------------------------
def _refusing_server(seen: list):
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "other-engine"}]})
        body = json.loads(request.content)
        seen.append(body)
        extra = sorted(k for k in body if k.startswith("video_"))
        if extra:
            return httpx.Response(400, json={"error": {"message": f"{extra[0]}: Extra inputs are not permitted"}})
        chunks = [{"choices": [{"delta": {"content": "B"}, "finish_reason": None}]},
                  {"choices": [{"delta": {}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 2}}]
        return httpx.Response(200, text="".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n")
    return httpx.Client(transport=httpx.MockTransport(handle))


def test_refused_knobs_are_not_sent(tmp_path):
    seen = []
    backend = EndpointBackend("http://engine:8000/v1/chat/completions", Gen(knobs={"packing": 2}),
                              client=_refusing_server(seen))
    assert backend.model_name == "other-engine" and backend.knobs_note.startswith("refused by the endpoint")
    folder = videomme_dir(tmp_path / "vmme", "jsonl")
    s = run(EvalConfig(task="videomme", data=str(folder / "questions.jsonl"), out=str(tmp_path / "o"),
                       endpoint="http://engine:8000", video_packing=2), backend=backend, progress=False)
    asked = seen[2:]  # after the two probes (with the knobs, then without)
    assert len(asked) == 1 and not any(k.startswith("video_") for k in asked[0])
    assert asked[0]["chat_template_kwargs"] == {"enable_thinking": False} and asked[0]["temperature"] == 0.0
    assert asked[0]["messages"][0]["content"][0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert s["by"]["duration"]["short"] == {"score": 0.0, "n": 2}  # "B" for D; the other short one has no options
    session = json.loads((tmp_path / "o" / "run.json").read_text())["sessions"][0]
    assert session["video_knobs"].startswith("refused")
    r = json.loads((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()[0])
    assert r["usage"] == {"prompt_tokens": 50, "visual_tokens": None, "generated_tokens": 2}


def test_probe_failure_is_a_clear_error():
    def handle(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(400, json={"error": {"message": "repetition_penalty: unsupported"}})
    with pytest.raises(ValueError, match="repetition_penalty"):
        EndpointBackend("http://x", Gen(), client=httpx.Client(transport=httpx.MockTransport(handle)))


def test_error_inside_the_stream_is_the_samples_error():
    def handle(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if json.loads(request.content)["max_tokens"] == 1:  # the probe
            return httpx.Response(200, text="data: [DONE]\n\n")
        return httpx.Response(200, text='data: {"error": {"message": "engine died"}}\n\n')
    backend = EndpointBackend("http://x", Gen(), client=httpx.Client(transport=httpx.MockTransport(handle)))
    out = backend.generate([([{"role": "user", "content": "hi"}], 0)])[0]
    assert out.error == "stream error: engine died"
