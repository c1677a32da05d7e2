"""Generation engine on tiny random-weight models (CPU).

Oracles: step-by-step argmax over full no-cache forwards of each request alone (greedy); the same request alone
(sampled batch rows); transformers' logits processors (repetition penalty, top-k, top-p); hand-computed values;
a scripted fake model (stop tokens, think budget) whose outputs are known by construction.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vlmcook.config import PRESETS
from vlmcook.data.processor import Processor, collate
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.infer.engine import (Engine, SamplingParams, apply_repetition_penalty, filter_top_k_top_p)
from vlmcook.model.minicpmv import MiniCPMV


# ---- a scripted stand-in for MiniCPMV (the engine's interface: embed, llm.model, llm.lm_head, llm.new_cache) -----
class _FakeCache:
    def __init__(self, batch_size: int):
        self.rows = torch.arange(batch_size)  # original batch row of each cache row (select reorders/drops)
        self.step = -1

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def select(self, rows):
        self.rows = self.rows[torch.as_tensor(rows, dtype=torch.long)]
        return self


class _ScriptedHead:
    def __init__(self, scripts, vocab, filler):
        self.scripts, self.vocab, self.filler = scripts, vocab, filler
        self.weight = torch.zeros(1)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:  # h [b, 2] = (batch row, step)
        logits = torch.zeros(h.shape[0], self.vocab)
        for i, (row, step) in enumerate(h.long().tolist()):
            script = self.scripts[row]
            logits[i, script[step] if step < len(script) else self.filler] = 10.0
        return logits


class _ScriptedLLM:
    def __init__(self, scripts, vocab, filler):
        self.lm_head = _ScriptedHead(scripts, vocab, filler)

    def new_cache(self, batch_size: int, max_len: int) -> _FakeCache:
        return _FakeCache(batch_size)

    def model(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None):
        x = inputs_embeds if inputs_embeds is not None else input_ids
        assert x.shape[0] == cache.batch_size, "fed rows must match the cache rows"
        cache.step += 1
        h = torch.zeros(x.shape[0], x.shape[1], 2)
        h[:, -1, 0] = cache.rows.float()
        h[:, -1, 1] = cache.step
        return h


class ScriptedModel:
    """Batch row b emits scripts[b][k] as its k-th sampled token (then `filler`), whatever it is fed; records the
    prompts it is given."""

    def __init__(self, scripts: list[list[int]], filler: int = 300, config=PRESETS["tiny"]):
        self.config = config
        self.llm = _ScriptedLLM(scripts, config.llm.vocab_size, filler)
        self.prompts = []

    def embed(self, input_ids, pixel_values=None, temporal_ids=None, image_bound=None):
        self.prompts.append(input_ids.clone())
        return torch.zeros(*input_ids.shape, 1)


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


# ---- logits processors vs hand values and transformers ----------------------------------------------------------
def test_repetition_penalty_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -4.0])
    out = apply_repetition_penalty(logits, [0, 1, 1, 4], 2.0)  # each seen id once, even if repeated
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0, -8.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -4.0]  # input untouched


def test_processors_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(64, generator=g) * 3
        seen = torch.randint(0, 64, (10,), generator=g)
        ref = RepetitionPenaltyLogitsProcessor(1.4)(seen[None], logits[None].clone())[0]
        assert torch.equal(apply_repetition_penalty(logits, seen.tolist(), 1.4), ref)
        for k, p in ((5, 1.0), (0, 0.7), (20, 0.5), (0, 0.05)):
            ref = logits[None].clone()
            if k:
                ref = TopKLogitsWarper(k)(None, ref)
            if p < 1:
                ref = TopPLogitsWarper(p)(None, ref)
            assert torch.equal(filter_top_k_top_p(logits, k, p), ref[0])


# ---- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(seed="x"), "seed"),
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
