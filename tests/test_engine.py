"""Generation engine on tiny random-weight models (CPU).

Oracles: step-by-step argmax over full no-cache forwards of each request alone (greedy); the same request alone
(sampled rows, rows joining a running batch at other steps, n samples vs n separate prompts); transformers' logits
processors (repetition penalty, top-k, top-p) and the softmax of their output (sampling frequencies); hand-computed
values; a scripted fake model (stop tokens, think budget) whose outputs are known by construction; the cache sizes
the model is handed (KV limits).
"""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlmcook.config import PRESETS
from vlmcook.data.processor import Processor, collate
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.infer.engine import (MIN_TEMPERATURE, PENALTY_RANGE, Engine, Limits, QueueFullError, SamplingParams,
                                  WontFitError, apply_repetition_penalty, default_limits, kv_bytes_per_token,
                                  sample, top_k_top_p)
from vlmcook.model.llm import KVCache
from vlmcook.model.minicpmv import MiniCPMV

ROOMY = Limits(max_rows=16, max_queue=16, max_kv_tokens=10**6)


# ---- a scripted stand-in for MiniCPMV (the engine's interface: embed, new_cache, prefill, decode_step, config) ----
_TAG_KV = dataclasses.replace(PRESETS["tiny"].llm, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                              head_dim=2)


class ScriptedModel:
    """Row k of a prefill emits scripts[k][j] as its j-th sampled token (then `filler`), whatever it is fed. Each row
    keeps (k, j) in its cache keys, so it stays itself when the engine drops, repeats and joins cache rows. Records
    the prompts it is given."""

    def __init__(self, scripts: list[list[int]], filler: int = 300, config=PRESETS["tiny"]):
        self.scripts, self.filler, self.config, self.prompts = scripts, filler, config, []

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(_TAG_KV, batch_size, max_len)

    def embed(self, input_ids, pixel_values=None, temporal_ids=None, image_bound=None):
        self.prompts.append(input_ids.clone())
        return torch.zeros(*input_ids.shape, 1)

    def prefill(self, embeds, attention_mask, cache):
        B, T = attention_mask.shape
        cache.extend(attention_mask.bool(), T)
        cache.length = T
        cache.k[0][:, 0, T - 1] = torch.stack([torch.arange(B), torch.zeros(B)], 1)  # (script, step 0)
        return self._logits(cache)

    def decode_step(self, token_ids, cache):
        past = cache.length
        cache.extend(None, 1)
        cache.length = past + 1
        cache.k[0][:, 0, past] = cache.k[0][:, 0, past - 1] + torch.tensor([0.0, 1.0])  # next step
        return self._logits(cache)

    def _logits(self, cache):
        logits = torch.zeros(cache.batch_size, self.config.llm.vocab_size)
        for i, (k, j) in enumerate(cache.k[0][:, 0, cache.length - 1].long().tolist()):
            script = self.scripts[k]
            logits[i, script[j] if j < len(script) else self.filler] = 10.0
        return logits


class Recording:
    """A model wrapper that records each forward the engine runs ("decode"/"prefill", rows, cache positions
    allocated), optionally slowed down so that a test's thread keeps up with the steps."""

    def __init__(self, model, delay: float = 0.0):
        self.model, self.delay, self.calls = model, delay, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def decode_step(self, token_ids, cache):
        time.sleep(self.delay)
        self.calls.append(("decode", cache.batch_size, cache.batch_size * cache.max_len))
        return self.model.decode_step(token_ids, cache)

    def prefill(self, embeds, attention_mask, cache):
        self.calls.append(("prefill", cache.batch_size, cache.batch_size * cache.max_len))
        return self.model.prefill(embeds, attention_mask, cache)


# ---- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MiniCPMV(PRESETS["tiny"]).eval()
    with torch.no_grad():  # sharper logits: argmax margins well above float noise of padded vs unpadded math
        m.llm.lm_head.weight.mul_(8)
    return m


@pytest.fixture(scope="module")
def proc(tok):
    return Processor(tok, PRESETS["tiny"])


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _requests(proc):
    """Three prompts of different lengths: text only, an image, a video from frames in 2 packages."""
    frames = [_image(64, 48, 10 + i) for i in range(3)]
    return [
        proc([{"role": "user", "content": "Hi"}]),
        proc([{"role": "user", "content": [_image(40, 30, 1), "What is in this picture, please?"]}], max_slice_nums=1),
        proc([{"role": "user", "content": [{"type": "video", "frames": frames, "packages": [[0, 5], [10]]},
                                           "Describe"]}]),
    ]


@torch.no_grad()
def _oracle_greedy(model, sample, n, stop_ids, penalty=1.0):
    """Argmax over a full no-cache forward of the growing sequence, one request alone, no padding (HF penalty on
    the new ids). The request's merged prompt embeddings are computed once (the vision side is the same each step)."""
    prompt = model.embed(sample["input_ids"], sample["pixel_values"], sample["temporal_ids"], sample["image_bound"])
    out = []
    for _ in range(n):
        new = model.llm.model.embed_tokens(torch.tensor([out], dtype=torch.long))  # [1, k, D]
        logits = model.llm(inputs_embeds=torch.cat([prompt, new], 1))[0, -1]  # [V]
        if out and penalty != 1.0:
            from transformers import RepetitionPenaltyLogitsProcessor
            logits = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([out]), logits[None].clone())[0]
        t = int(logits.argmax())
        if t in stop_ids:
            break
        out.append(t)
    return out


# ---- greedy vs the no-cache oracle --------------------------------------------------------------------------------
def test_greedy_single_matches_full_forward(model, tok, proc):
    sample = _requests(proc)[1]
    gen = Engine(model, tok).generate(collate([sample], tok.pad_id), SamplingParams(max_new_tokens=8))[0]
    assert gen.token_ids == _oracle_greedy(model, sample, 8, tok.stop_ids)
    assert gen.visual_tokens == 8 and gen.prompt_tokens == sample["input_ids"].shape[1]
    assert 0 < gen.vision_s < gen.prefill_s and gen.decode_s > 0


def test_greedy_batch_matches_full_forward(model, tok, proc):
    samples = _requests(proc)
    lens = [s["input_ids"].shape[1] for s in samples]
    assert len(set(lens)) == 3  # different lengths -> real left padding
    # Different max_new_tokens: rows finish at different steps and are dropped from the cache mid-batch.
    params = [SamplingParams(max_new_tokens=n) for n in (3, 9, 6)]
    gens = Engine(model, tok).generate(collate(samples, tok.pad_id, "left"), params)
    for s, p, g in zip(samples, params, gens):
        assert g.token_ids == _oracle_greedy(model, s, p.max_new_tokens, tok.stop_ids)
    assert [g.visual_tokens for g in gens] == [0, 8, 16]  # 1 image package, 2 video packages x 8 queries
    assert [g.prompt_tokens for g in gens] == lens


def test_greedy_with_repetition_penalty_matches_oracle(model, tok, proc):
    samples = _requests(proc)[:2]
    params = SamplingParams(max_new_tokens=8, repetition_penalty=1.8)
    gens = Engine(model, tok).generate(collate(samples, tok.pad_id), params)
    for s, g in zip(samples, gens):
        assert g.token_ids == _oracle_greedy(model, s, 8, tok.stop_ids, penalty=1.8)


# ---- sampling: per-request seeds ----------------------------------------------------------------------------------
def test_sampled_batch_equals_one_at_a_time(model, tok, proc):
    samples = _requests(proc)
    params = [SamplingParams(max_new_tokens=10, temperature=1.3, seed=1),
              SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=2),
              SamplingParams(max_new_tokens=7, temperature=1.0, repetition_penalty=1.3, seed=3)]
    engine = Engine(model, tok)
    batched = engine.generate(collate(samples, tok.pad_id), params)
    alone = [engine.generate(collate([s], tok.pad_id), p)[0] for s, p in zip(samples, params)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    # the seed matters (a sampler that ignored it would pass the line above)
    other = engine.generate(collate(samples[:1], tok.pad_id), dataclasses.replace(params[0], seed=99))[0]
    assert other.token_ids != alone[0].token_ids


def test_stream_events_equal_generate(model, tok, proc):
    samples = _requests(proc)
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=n) for n in (4, 8, 6)]
    batch = collate(samples, tok.pad_id)
    engine = Engine(model, tok)
    tokens, finals = {0: [], 1: [], 2: []}, {}
    for ev in engine.stream(batch, params):
        assert ev.row not in finals, "no event after a row's final one"
        if ev.generation is None:
            tokens[ev.row].append(ev.token_id)
        else:
            finals[ev.row] = ev.generation
    gens = engine.generate(batch, params)
    assert [tokens[b] for b in range(3)] == [g.token_ids for g in gens] == [finals[b].token_ids for b in range(3)]


# ---- stops, lengths, thinking budget ------------------------------------------------------------------------------
def test_stop_tokens_and_lengths(tok):
    im_end, eot = tok.im_end_id, tok.endoftext_id
    scripts = [[40, 41, im_end, 42], [43, eot], [44, 45, 46, 47, 48, 49], [im_end]]
    model = ScriptedModel(scripts)
    batch = collate([_text_sample([7] * n) for n in (3, 5, 2, 4)], tok.pad_id)
    gens = Engine(model, tok).generate(batch, SamplingParams(max_new_tokens=4))
    assert [g.token_ids for g in gens] == [[40, 41], [43], [44, 45, 46, 47], []]
    assert [g.finish_reason for g in gens] == ["stop", "stop", "length", "stop"]
    assert [g.stop_id for g in gens] == [im_end, eot, None, im_end]
    assert [g.completion_tokens for g in gens] == [3, 2, 4, 1]
    assert [g.prompt_tokens for g in gens] == [3, 5, 2, 4]
    # custom stop ids replace the defaults; () never stops on a token
    g = Engine(ScriptedModel([[40, 41, im_end, 42]]), tok).generate(
        collate(batch_rows(1), tok.pad_id), SamplingParams(max_new_tokens=4, stop_ids=[41]))[0]
    assert (g.token_ids, g.finish_reason) == ([40], "stop")
    g = Engine(ScriptedModel([[40, im_end, 42]]), tok).generate(
        collate(batch_rows(1), tok.pad_id), SamplingParams(max_new_tokens=3, stop_ids=()))[0]
    assert (g.token_ids, g.finish_reason) == ([40, im_end, 42], "length")


def _text_sample(ids):
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": [[]], "temporal_ids": [[]], "image_bound": [torch.zeros(0, 2, dtype=torch.long)]}


def batch_rows(n):
    return [_text_sample([7, 8]) for _ in range(n)]


def test_max_new_tokens_on_real_model(model, tok, proc):
    g = Engine(model, tok).generate(collate(_requests(proc)[:1], tok.pad_id),
                                    SamplingParams(max_new_tokens=5, stop_ids=()))[0]
    assert len(g.token_ids) == 5 and g.finish_reason == "length" and g.completion_tokens == 5


def test_think_budget_closes_the_block(tok, proc):
    torch.manual_seed(1)
    m = MiniCPMV(PRESETS["tiny"]).eval()
    with torch.no_grad():  # `</think>` and the stop tokens get logit 0: never the argmax among 512 random logits
        for t in (tok.think_end_id, *tok.stop_ids):
            m.llm.lm_head.weight[t] = 0
    sample = proc([{"role": "user", "content": "Think about it"}], thinking=True)
    close = tok.encode("\n</think>\n\n")
    for budget in (0, 5):
        g = Engine(m, tok).generate(collate([sample], tok.pad_id),
                                    SamplingParams(max_new_tokens=budget + 7, think_budget=budget))[0]
        assert tok.think_end_id not in g.token_ids[:budget]
        assert g.token_ids[budget:budget + len(close)] == close and g.forced_think_end
        assert len(g.token_ids) == budget + 7  # forced tokens count towards max_new_tokens
    free = Engine(m, tok).generate(collate([sample], tok.pad_id), SamplingParams(max_new_tokens=12))[0]
    assert tok.think_end_id not in free.token_ids and not free.forced_think_end


def test_think_budget_not_forced_when_model_closes_itself(tok):
    te = tok.think_end_id
    scripted = [[40, 41, te, 42, 43, 44, 45, tok.im_end_id], [50, 51, 52, 53, 54, 55, 56, tok.im_end_id]]
    gens = Engine(ScriptedModel(scripted), tok).generate(collate(batch_rows(2), tok.pad_id),
                                                         SamplingParams(max_new_tokens=20, think_budget=3))
    assert gens[0].token_ids == scripted[0][:-1] and not gens[0].forced_think_end
    # row 1: 3 tokens, then the closing ids replace what the model proposed at steps 3-5 (53, 54, 55), then the
    # model answers from step 6 on
    assert gens[1].token_ids == [50, 51, 52, *tok.encode("\n</think>\n\n"), 56]
    assert gens[1].forced_think_end and gens[1].finish_reason == "stop"


# ---- iteration-level scheduling ---------------------------------------------------------------------------------
def _collect(streams: dict, tokens: dict, finals: dict, i: int) -> None:
    ev = next(streams[i])
    if ev.generation is None:
        tokens[i].append(ev.token_id)
    else:
        finals[i] = ev.generation
        del streams[i]


def test_staggered_arrivals_equal_alone(model, tok, proc):
    """Request i+1 arrives once request i has streamed 3 tokens: each joins a running batch mid-generation (its
    prefill beside the others' decode), rows leave at different steps, and every request gets the tokens it gets
    alone, greedy and seeded alike."""
    samples = _requests(proc) + [proc([{"role": "user", "content": "Another one, a little longer than Hi"}])]
    params = [SamplingParams(max_new_tokens=14, temperature=1.0, seed=1, stop_ids=()),
              SamplingParams(max_new_tokens=9, stop_ids=()),
              SamplingParams(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=2,
                             stop_ids=()),
              SamplingParams(max_new_tokens=6, temperature=1.3, seed=3, stop_ids=())]
    alone = [Engine(model, tok, ROOMY).generate(collate([s], tok.pad_id), p)[0] for s, p in zip(samples, params)]
    rec = Recording(model, delay=0.01)
    engine = Engine(rec, tok, ROOMY)
    streams, tokens, finals, started = {}, {i: [] for i in range(4)}, {}, 0
    while len(finals) < 4:
        if started < 4 and (started == 0 or len(tokens[started - 1]) >= 3):
            streams[started] = engine.stream(collate([samples[started]], tok.pad_id), params[started])
            started += 1
        for i in list(streams):
            _collect(streams, tokens, finals, i)
    for i in range(4):
        assert tokens[i] == finals[i].token_ids == alone[i].token_ids, i
        assert finals[i].prompt_tokens == alone[i].prompt_tokens and finals[i].visual_tokens == alone[i].visual_tokens
    kinds = [c[0] for c in rec.calls]
    joins = sum(a == "decode" and b == "prefill" for a, b in zip(kinds, kinds[1:]))
    assert joins == 3 and max(c[1] for c in rec.calls if c[0] == "decode") >= 3  # real joins, a real batch


def test_cancelled_rows_leave_at_the_next_step(model, tok, proc):
    rec = Recording(model, delay=0.005)
    engine = Engine(rec, tok, ROOMY)
    samples = _requests(proc)
    endless = engine.stream(collate([samples[0]], tok.pad_id), SamplingParams(max_new_tokens=3000, stop_ids=()))
    next(endless), next(endless)
    short = SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, stop_ids=())
    other = engine.stream(collate([samples[1]], tok.pad_id), short)
    first = next(other)
    endless.close()
    steps_at_close = len(rec.calls)
    rest = [first, *other]
    assert [e.token_id for e in rest[:-1]] == rest[-1].generation.token_ids == \
        Engine(model, tok, ROOMY).generate(collate([samples[1]], tok.pad_id), short)[0].token_ids
    deadline = time.time() + 10
    while engine.load()["running_rows"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.load() == {"running_rows": 0, "waiting": 0} and engine.cancelled == 1
    # the other request's 12 steps ran with the endless row gone after at most 2 of them
    assert sum(c == ("decode", 2, c[2]) for c in rec.calls[steps_at_close:]) <= 2


def test_cancelled_before_joining_is_never_prefilled(model, tok, proc):
    rec = Recording(model, delay=0.005)
    engine = Engine(rec, tok, Limits(max_rows=1, max_queue=4, max_kv_tokens=10**6))
    samples = _requests(proc)
    running = engine.stream(collate([samples[0]], tok.pad_id), SamplingParams(max_new_tokens=3000, stop_ids=()))
    next(running)
    waiting = engine._submit(collate([samples[1]], tok.pad_id), SamplingParams(), 1)  # queued: the one row is taken
    assert engine.load()["waiting"] == 1
    waiting.cancelled.set()
    running.close()
    deadline = time.time() + 10
    while engine.load() != {"running_rows": 0, "waiting": 0} and time.time() < deadline:
        time.sleep(0.01)
    assert engine.cancelled == 2 and [c[0] for c in rec.calls].count("prefill") == 1


# ---- n samples, one prefill ---------------------------------------------------------------------------------------
def test_num_samples_share_one_prefill(model, tok, proc):
    """n samples of a prompt == the prompt repeated n times as separate rows with seeds seed, seed+1, ... (n
    prefills), from a single prefill row; greedy samples are all the same."""
    samples = _requests(proc)[1:]  # an image prompt and a video prompt
    p = SamplingParams(max_new_tokens=7, temperature=1.0, top_k=30, seed=11, stop_ids=())
    rec = Recording(model)
    got = Engine(rec, tok, ROOMY).generate(collate(samples, tok.pad_id), p, num_samples=3)
    assert [c[:2] for c in rec.calls if c[0] == "prefill"] == [("prefill", 2)]  # one forward, one row per prompt
    rows = [s for s in samples for _ in range(3)]
    seeded = [dataclasses.replace(p, seed=11 + k) for _ in samples for k in range(3)]
    separate = Engine(model, tok, ROOMY).generate(collate(rows, tok.pad_id), seeded)
    assert [g.token_ids for g in got] == [g.token_ids for g in separate]
    assert len({tuple(g.token_ids) for g in got[:3]}) == 3  # the samples differ
    assert [g.visual_tokens for g in got] == [8] * 3 + [16] * 3
    greedy = Engine(model, tok, ROOMY).generate(collate(samples[:1], tok.pad_id), SamplingParams(max_new_tokens=5),
                                                num_samples=4)
    assert len({tuple(g.token_ids) for g in greedy}) == 1


# ---- limits --------------------------------------------------------------------------------------------------------
def test_kv_limit_holds_and_queues(model, tok, proc):
    """Two requests whose padded windows do not fit together run one after the other (never a cache over the
    limit), each as alone; one that can never fit is refused up front."""
    samples = _requests(proc)[:2]
    T = max(s["input_ids"].shape[1] for s in samples)
    p = SamplingParams(max_new_tokens=10, stop_ids=())
    limit = 2 * (T + 9) - 1  # either alone fits (<= T + 9), both together not
    rec = Recording(model)
    engine = Engine(rec, tok, Limits(max_rows=4, max_queue=4, max_kv_tokens=limit))
    out = [None, None]

    def run(i):
        out[i] = engine.generate(collate([samples[i]], tok.pad_id), p)[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == [Engine(model, tok, ROOMY).generate(collate([s], tok.pad_id), p)[0].token_ids for s in samples]
    assert max(c[2] for c in rec.calls) <= limit and max(c[1] for c in rec.calls) == 1
    with pytest.raises(WontFitError, match=rf"row 0: 1 x \(\d+ prompt \+ {limit} new tokens - 1\) = \d+ KV-cache "
                                           rf"positions, more than this engine holds \({limit}, max_kv_tokens\)"):
        engine.generate(collate(samples[:1], tok.pad_id), dataclasses.replace(p, max_new_tokens=limit))
    with pytest.raises(WontFitError, match=r"5 samples of one prompt need 5 rows at once; this engine runs at most 4"):
        engine.generate(collate(samples[:1], tok.pad_id), p, num_samples=5)


def test_full_queue_is_refused(model, tok, proc):
    engine = Engine(Recording(model, delay=0.005), tok, Limits(max_rows=1, max_queue=1, max_kv_tokens=10**6))
    samples = _requests(proc)
    running = engine.stream(collate([samples[0]], tok.pad_id), SamplingParams(max_new_tokens=3000, stop_ids=()))
    next(running)
    waiting = engine._submit(collate([samples[1]], tok.pad_id), SamplingParams(), 1)
    with pytest.raises(QueueFullError, match=r"1 requests are waiting already \(max_queue 1\)"):
        engine.generate(collate([samples[2]], tok.pad_id), SamplingParams())
    waiting.cancelled.set()
    running.close()


def test_limits_lowered_while_waiting(model, tok, proc):
    engine = Engine(Recording(model, delay=0.005), tok, Limits(max_rows=1, max_queue=4, max_kv_tokens=10**6))
    samples = _requests(proc)
    running = engine.stream(collate([samples[0]], tok.pad_id), SamplingParams(max_new_tokens=3000, stop_ids=()))
    next(running)
    waiting = engine._submit(collate([samples[1]], tok.pad_id), SamplingParams(max_new_tokens=50), 1)
    engine.limits = Limits(max_rows=1, max_queue=4, max_kv_tokens=20)
    running.close()
    error = waiting.events.get(timeout=10)
    assert isinstance(error, WontFitError) and "lowered since it was queued" in str(error)


def test_kv_bytes_and_default_limits():
    # 2 (keys, values) x layers x kv heads x head_dim x bytes, + 1 mask byte; the 8B numbers are the release's config
    tiny, demo, big = (PRESETS[k].llm for k in ("tiny", "demo", "v4_5"))
    assert kv_bytes_per_token(KVCache(tiny, 1, 1)) == 2 * 2 * 2 * 16 * 4 + 1 == 513
    assert kv_bytes_per_token(KVCache(demo, 1, 1)) == 2 * 3 * 2 * 32 * 4 + 1 == 1537
    assert kv_bytes_per_token(KVCache(big, 1, 1, dtype=torch.bfloat16)) == 2 * 36 * 8 * 128 * 2 + 1 == 147_457
    lim = default_limits(513, 4096, torch.device("cpu"))
    assert 1 <= lim.max_rows <= 64 and lim.max_queue == lim.max_rows and 1 <= lim.max_kv_tokens <= 64 * 4096
    with pytest.raises(ValueError, match="Limits.max_queue = 0: must be an int >= 1"):
        Limits(max_rows=1, max_queue=0, max_kv_tokens=10)


# ---- sampling: HF's processors, rows independent, frequencies, extreme values ------------------------------------
def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -4.0], [1.0, -1.0, 1.0, 1.0, 1.0]])
    out = apply_repetition_penalty(logits, [[0, 1, 1, 4], [1, 2]], [2.0, 1.0])  # each seen id once; 1 = off
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -8.0], [1.0, -1.0, 1.0, 1.0, 1.0]]
    assert logits[0].tolist() == [2.0, -1.0, 0.5, 3.0, -4.0]  # input untouched


def _hf_filtered(logits, k, p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    ref = logits[None].clone()
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
        ref = TopPLogitsWarper(p)(None, ref)
    return ref[0]


def test_top_k_keeps_ties_at_the_kth_value_as_transformers():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0], [3.0] * 6, [5.0, 4.0, 4.0, 1.0, 1.0, 1.0]])
    for k, p in ((2, 1.0), (1, 1.0), (3, 0.9), (4, 1.0)):
        vals, ids = top_k_top_p(logits, [k] * 3, [p] * 3)
        ours = torch.full_like(logits, -torch.inf).scatter(1, ids, vals)
        for b in range(3):
            assert torch.equal(ours[b], _hf_filtered(logits[b], k, p) - logits[b].max()), (k, p, b)


def test_processors_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    ks, ps = [5, 0, 20, 0, 64, 3, 1], [1.0, 0.7, 0.5, 0.05, 0.9, 1.0, 0.3]  # 64 = the whole vocabulary
    pens = [1.4, 1.4, 0.8, 1.0, 2.5, 1.4, 1.1]
    for _ in range(20):
        logits = torch.randn(len(ks), 64, generator=g) * 3
        seen = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (10, 0, 3, 25, 1, 7, 2)]
        penalised = apply_repetition_penalty(logits, seen, pens)
        for b in range(len(ks)):
            ref = RepetitionPenaltyLogitsProcessor(pens[b])(torch.tensor([seen[b]]), logits[b:b + 1].clone())[0] \
                if seen[b] else logits[b]
            assert torch.equal(penalised[b], ref)
        vals, ids = top_k_top_p(logits, ks, ps)  # values shifted by the row's maximum
        ours = torch.full_like(logits, -torch.inf).scatter(1, ids, vals)
        for b in range(len(ks)):
            assert torch.equal(ours[b], _hf_filtered(logits[b], ks[b], ps[b]) - logits[b].max()), (ks[b], ps[b])


MIXED = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20),
         SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.9, top_k=5, top_p=0.5,
                                                                    repetition_penalty=1.3),
         SamplingParams(temperature=2.0, repetition_penalty=0.9), SamplingParams(repetition_penalty=1.5)]


def test_sample_rows_are_independent():
    """One call for mixed rows (greedy, whole vocabulary, top-k, top-p alone: a full sort, both, penalties) gives each
    row the token it gets alone from the same generator state."""
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        logits = torch.randn(len(MIXED), 300, generator=g) * 4
        seen = [torch.randint(0, 300, (trial % 7,), generator=g).tolist() for _ in MIXED]
        gens = lambda: [torch.Generator().manual_seed(100 * trial + b) if p.temperature else None  # noqa: E731
                        for b, p in enumerate(MIXED)]
        together = sample(logits, MIXED, seen, gens())
        alone = [sample(logits[b:b + 1], [p], [seen[b]], [gen])[0] for b, (p, gen) in enumerate(zip(MIXED, gens()))]
        assert together == alone


@pytest.mark.parametrize("p", [SamplingParams(temperature=0.7, top_k=6, top_p=0.9, repetition_penalty=1.5),
                               SamplingParams(temperature=1.3, repetition_penalty=1.5)])
def test_sampling_frequencies_match_transformers_distribution(p):
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0])
    seen = [0, 5]
    ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([seen]), logits[None].clone())
    ref = _hf_filtered(TemperatureLogitsWarper(p.temperature)(None, ref)[0], p.top_k, p.top_p).softmax(-1)
    n, gen = 20_000, torch.Generator().manual_seed(0)
    drawn = sample(logits.expand(n, -1), [p] * n, [seen] * n, [gen] * n)
    freq = torch.bincount(torch.tensor(drawn), minlength=8) / n
    assert (freq - ref).abs().max() < 0.015  # 4 standard deviations at n = 20,000
    assert bool((freq[ref == 0] == 0).all())  # what the filters remove is never drawn


@pytest.mark.parametrize("logits", [[1e30, -1e30, 0.0, 5.0], [-1e30] * 4, [3.0] * 4, [0.0, 1e-30, -1e-30, 1e30]])
@pytest.mark.parametrize("temperature", [0, MIN_TEMPERATURE, 2.0, 1e4])
@pytest.mark.parametrize("penalty", [PENALTY_RANGE[0], 1.0, PENALTY_RANGE[1]])
def test_extreme_accepted_values_give_a_token(logits, temperature, penalty):
    """Values at the accepted bounds never reach inf/nan: a token, and the argmax when the choice is forced."""
    logits = torch.tensor([logits])
    for k, top_p in ((0, 1.0), (2, 1e-30), (10**9, 0.5)):
        p = SamplingParams(temperature=temperature, top_k=k, top_p=top_p, repetition_penalty=penalty, seed=0)
        tok = sample(logits, [p], [[0, 3]], [torch.Generator().manual_seed(0)])[0]
        penalised = apply_repetition_penalty(logits, [[0, 3]], [penalty])[0]
        assert 0 <= tok < 4
        if temperature == 0:
            assert tok == int(penalised.argmax())
        if top_p == 1e-30:  # top-p keeps only the most likely token (one of them, if tied)
            assert penalised[tok] == penalised.max()


# ---- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1e-45), "temperature"), (dict(temperature=MIN_TEMPERATURE / 2), "temperature"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"), (dict(repetition_penalty=1e300), "repetition_penalty"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(seed="x"), "seed"), (dict(seed=2**80), "seed"),
    (dict(seed=-1), "seed"),
    (dict(think_budget=-1), "think_budget"), (dict(stop_ids="abc"), "stop_ids"),
    (dict(stop_ids=[1, -2]), "stop_ids"), (dict(think_end_ids=[]), "think_end_ids"),
])
def test_bad_params(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kw)


def test_prompt_longer_than_context(tok, proc):
    cfg = PRESETS["tiny"]
    small = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, max_position_embeddings=12))
    m = MiniCPMV(small).eval()
    sample = proc([{"role": "user", "content": "a fairly long question that will not fit"}])
    with pytest.raises(ValueError, match=r"row 0: the prompt is \d+ tokens, the model's context is 12"):
        Engine(m, tok).generate(collate([sample], tok.pad_id), SamplingParams())
    # a prompt that fits stops at the context length
    short = {"input_ids": torch.tensor([[9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])}
    g = Engine(m, tok).generate(short, SamplingParams(max_new_tokens=50, stop_ids=()))[0]
    assert len(g.token_ids) == 2 and g.finish_reason == "length"


def test_bad_batches(model, tok, proc):
    engine = Engine(model, tok)
    samples = _requests(proc)[:2]
    right = collate(samples, tok.pad_id, padding_side="right")
    with pytest.raises(ValueError, match=r"rows \[0\] are not left-padded"):
        engine.generate(right, SamplingParams())
    with pytest.raises(ValueError, match="got 3 params for a batch of 2"):
        engine.generate(collate(samples, tok.pad_id), [SamplingParams()] * 3)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.generate({"input_ids": torch.tensor([[5, 512]])}, SamplingParams())
    one = collate(samples[1:], tok.pad_id)
    for bound in ([[0, 7]], [[0, 4], [3, 7]], [[-1, 7]]):  # 7 slots for 8, overlapping, outside the prompt
        with pytest.raises(ValueError, match=r"row 0: image_bound .* covering 1 package\(s\) x 8 slots"):
            engine.generate({**one, "image_bound": [torch.tensor(bound)]}, SamplingParams())
    with pytest.raises(ValueError, match="num_samples = 0"):
        engine.generate(one, SamplingParams(), num_samples=0)
    assert engine.load() == {"running_rows": 0, "waiting": 0}  # nothing was queued


def test_chat_n_is_checked_up_front(model, tok):
    from vlmcook.infer.api import ChatModel

    chat = ChatModel(model, tok)
    chat.engine.limits = Limits(max_rows=4, max_queue=4, max_kv_tokens=10**6)
    for n in (0, 2.5, True, "2"):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            chat.chat("Hi", n=n, stream=True)  # before any chunk
    t0 = time.perf_counter()
    with pytest.raises(WontFitError, match="1000000 samples of one prompt need 1000000 rows"):
        chat.chat("Hi", n=10**6)
    assert time.perf_counter() - t0 < 1  # refused before any per-sample work
    results = chat.chat("Hi", n=3, seed=2, temperature=1.0, max_new_tokens=6)
    assert [r.token_ids for r in results] == [chat.chat("Hi", seed=2 + s, temperature=1.0, max_new_tokens=6).token_ids
                                              for s in range(3)]
