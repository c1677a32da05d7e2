"""Serving throughput over real HTTP, and RL rollout time, on a random model with the released 151,748-id vocabulary.

    .venv/bin/python benchmarks/bench_serving.py [--clients 1 4 16] [--tokens 32] [--threads 1] [--before 902d603]

Model: the `demo` preset with vocab_size from tests/fixtures/minicpm-v-4_5/config.json, random weights, saved in the
released layout with the released tokenizer (the real files in ../shared/reference/minicpm-v-4_5 when present, else
rebuilt from tests/fixtures as tests/conftest.py does). `vlmcook serve` runs it in a subprocess; clients are threads
here, streaming SSE with httpx.
Serving: for each N in --clients, N seeded requests (the server's sampling presets, --tokens each) one after another,
then all N at once, --rounds times: medians of aggregate completion tokens/s and time to first token (first SSE
event) p50/p95; whether every output equals its one-at-a-time twin. Bound (issue 15's TTFT target): 3 x TTFT alone
+ one prefill of the N prompts.
Rollout: G samples of one image prompt (temperature 1, --rl-tokens each): the engine at commit --before (G prefills,
per-row sampling) vs now (one prefill, batched sampling), in this process, best of --repeat; with the demo preset's
image preprocessing (one 140-px view) and with the release's slicing (448-px views, up to 9 slices + the overview).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import write_released_layout  # noqa: E402
from vlmcook.checkpoint import save_model  # noqa: E402
from vlmcook.config import PRESETS  # noqa: E402
from vlmcook.data.processor import Processor, collate  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402
from vlmcook.infer.engine import Engine, SamplingParams  # noqa: E402
from vlmcook.model.minicpmv import MiniCPMV  # noqa: E402
from vlmcook.rl.rollout import Task, make_groups, rollout  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "minicpm-v-4_5"
REFERENCE = ROOT.parent / "shared" / "reference" / "minicpm-v-4_5"


def build_model(folder: Path) -> tuple[MiniCPMV, Tokenizer]:
    vocab = json.loads((FIXTURES / "config.json").read_text())["vocab_size"]
    cfg = PRESETS["demo"]
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=vocab))
    if (REFERENCE / "vocab.json").is_file():
        tok = Tokenizer.from_dir(REFERENCE)
    else:
        tok = Tokenizer.from_dir(write_released_layout(FIXTURES, folder.parent / "tokenizer"))
    assert tok.vocab_size == vocab, (tok.vocab_size, vocab)
    torch.manual_seed(0)
    model = MiniCPMV(cfg).eval()
    save_model(model, folder, tokenizer=tok)
    return model, tok


# ---- serving ------------------------------------------------------------------------------------------------------
def start_server(folder: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "vlmcook.cli", "serve", "--model", str(folder), "--port", str(port),
                             "--log-level", "warning"], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def one_request(client: httpx.Client, i: int, tokens: int) -> dict:
    """One streaming request; -> its text, completion tokens, time to first event and end, from its send."""
    body = {"messages": [{"role": "user", "content": f"Request {i}: tell me something about the number {i * 7}."}],
            "max_tokens": tokens, "seed": 1000 + i, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            first = first or time.perf_counter() - t0
            event = json.loads(line[6:])
            assert "error" not in event, event
            usage = event.get("usage") or usage
            for c in event["choices"]:
                text.append(c["delta"].get("content") or "")
    return {"text": "".join(text), "tokens": usage["completion_tokens"], "ttft": first,
            "start": t0, "end": time.perf_counter()}


def run_clients(client: httpx.Client, ids: list[int], tokens: int, together: bool) -> list[dict]:
    if not together:
        return [one_request(client, i, tokens) for i in ids]
    with ThreadPoolExecutor(len(ids)) as pool:
        return list(pool.map(lambda i: one_request(client, i, tokens), ids))


def summary(results: list[dict]) -> tuple[float, float, float]:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    p95 = ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]
    return sum(r["tokens"] for r in results) / wall, statistics.median(ttft), p95


def prefill_seconds(model, tok, n: int, repeat: int) -> float:
    """One prefill of n of the benchmark's prompts (one token generated), in this process."""
    proc, engine = Processor(tok, model.config), Engine(model, tok)
    rows = [proc([{"role": "user", "content": f"Request {i}: tell me something about the number {i * 7}."}])
            for i in range(n)]
    best = float("inf")
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        engine.generate(collate(rows, tok.pad_id), SamplingParams(max_new_tokens=1))
        best = min(best, time.perf_counter() - t0)
    return best


def bench_serving(folder: Path, model, tok, args) -> None:
    print(f"serving: {args.tokens} tokens per request, server presets + per-request seeds, server on "
          f"{args.threads} torch thread(s); medians of {args.rounds} round(s)\n")
    print(f"{'clients':>7} {'one at a time tok/s':>20} {'together tok/s':>15} {'ratio':>6} {'TTFT alone p50':>15} "
          f"{'TTFT p50':>9} {'TTFT p95':>9} {'bound':>7} {'same outputs':>13}")
    proc, url = start_server(folder, args.threads)
    # One client for all threads: its pool keeps the connections open (no connection set-up inside a TTFT).
    client = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=max(args.clients)))
    try:
        run_clients(client, list(range(max(args.clients))), 2, together=True)  # warm-up, opens the connections
        for n in args.clients:
            ids, rounds, same = list(range(n)), [], True
            for _ in range(args.rounds):  # alternating, so that a change in the machine's load hits both
                alone = run_clients(client, ids, args.tokens, together=False)
                together = run_clients(client, ids, args.tokens, together=True)
                rounds.append((*summary(alone), *summary(together)))
                same &= all(a["text"] == t["text"] for a, t in zip(alone, together))
            tps_a, ttft_a, _, tps_t, p50, p95 = (statistics.median(x) for x in zip(*rounds))
            bound = 3 * ttft_a + prefill_seconds(model, tok, n, args.repeat)
            print(f"{n:>7} {tps_a:>20.1f} {tps_t:>15.1f} {tps_t / tps_a:>6.2f} {ttft_a:>15.3f} {p50:>9.3f} "
                  f"{p95:>9.3f} {bound:>7.3f} {str(same):>13}", flush=True)
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)


# ---- RL rollouts --------------------------------------------------------------------------------------------------
def engine_at(rev: str) -> type:
    """The Engine class of vlmcook/infer/engine.py at git revision `rev`."""
    src = subprocess.run(["git", "show", f"{rev}:vlmcook/infer/engine.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType(f"engine_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(src, f"engine.py@{rev}", "exec"), module.__dict__)
    return module


# (what, side of the square image, preprocessing fields of the config: not weights)
ROLLOUT_CASES = [("the demo preset's preprocessing", 448, {}),
                 ("the release's slicing", 1344, {"scale_resolution": 448, "max_slice_nums": 9})]


def bench_rollout(model, tok, args) -> None:
    old = engine_at(args.before)
    G = args.group
    print(f"\nRL rollout: G = {G} samples of one image prompt, {args.rl_tokens} new tokens each, temperature 1; "
          f"best of {args.repeat}")
    print(f"{'image':<40} {'prompt':>20} {'before (' + args.before + ')':>17} {'now':>8} {'speed-up':>9}")
    for what, side, fields in ROLLOUT_CASES:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        task = Task("img", [{"role": "user", "content": [{"type": "image", "image": image}, "What is shown?"]}],
                    "x", "none")
        proc = Processor(tok, dataclasses.replace(model.config, **fields))

        def before():  # the old rollout's call: the prompt repeated G times, G prefills, per-row sampling
            group = make_groups([task], [True], proc)[0]
            params = [old.SamplingParams(max_new_tokens=args.rl_tokens, temperature=1.0, seed=g, stop_ids=())
                      for g in range(G)]
            return old.Engine(model, tok).generate(collate([group.prompt] * G, tok.pad_id, "left"), params)

        def now():
            group = make_groups([task], [True], proc)[0]
            rollout(Engine(model, tok), [group], G, args.rl_tokens, seed=0)
            return group.completions

        times = []
        for fn in (before, now):
            fn()  # warm-up
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - t0)
            assert all(len(c.token_ids) == args.rl_tokens for c in out)
            times.append(best)
        prompt = make_groups([task], [True], proc)[0].prompt
        shape = f"{prompt['input_ids'].shape[1]} tok, {len(prompt['pixel_values'][0])} view(s)"
        print(f"{f'{side}x{side}, {what}':<40} {shape:>20} {times[0]:>15.3f} s {times[1]:>6.3f} s "
              f"{times[0] / times[1]:>8.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=32, help="completion tokens per request (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the rollouts "
                    "(default 1: on 2 cores the clients need the other one)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats of the rollouts / prefills (best is kept)")
    ap.add_argument("--rounds", type=int, default=3, help="serving rounds per client count (medians are shown)")
    ap.add_argument("--before", default="902d603", help="git revision of the engine before batching")
    ap.add_argument("--group", type=int, default=8, help="RL samples per prompt, G (default 8)")
    ap.add_argument("--rl-tokens", type=int, default=32, help="new tokens per rollout sample (default 32)")
    ap.add_argument("--skip", choices=["serving", "rollout"], help="leave one part out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build_model(Path(tmp) / "model")
        print(f"model: demo preset, vocab {model.config.llm.vocab_size:,}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32, CPU; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
        if args.skip != "serving":
            bench_serving(Path(tmp) / "model", model, tok, args)
        if args.skip != "rollout":
            bench_rollout(model, tok, args)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
