"""Chat API: prefill strings (docs/reference.md 11.15), reasoning/answer split, streaming == non-streaming (UTF-8 safe),
batch == single, multi-turn, video knobs, loading. Scripted fake model (test_engine.ScriptedModel) where the output
must be known; tiny random-weight MiniCPMV elsewhere (no test relies on its text)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from test_engine import ScriptedModel
from vlmcook.checkpoint import save_model
from vlmcook.config import PRESETS
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.data.processor import ContextLengthError
from vlmcook.infer.api import ChatModel, split_output, stable_split
from vlmcook.model.minicpmv import MiniCPMV


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    return ChatModel(MiniCPMV(PRESETS["tiny"]).eval(), tok)


def _img(seed=0, w=40, h=30):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _scripted(tok, text: str, end=True):
    """A ChatModel whose (single-row) output is exactly `text` (+ <|im_end|>)."""
    fake = ScriptedModel([tok.encode(text) + ([tok.im_end_id] if end else [])])
    return ChatModel(fake, tok), fake


def _collect(chunks):
    chunks = list(chunks)
    assert sum(c.result is not None for c in chunks) == 1 and chunks[-1].result is not None
    return chunks, "".join(c.text for c in chunks), "".join(c.reasoning for c in chunks), \
        "".join(c.answer for c in chunks)


# ---- prompts ---------------------------------------------------------------------------------------------------------
def test_thinking_prefill_matches_vector_15(tok):
    msgs = [{"role": "user", "content": "(<image>./</image>)\nWhat is this?"}]
    tid = tok.token_to_id
    header = [tid("<|im_start|>"), *tok.encode("assistant"), *tok.encode("\n")]
    want = {False: header + [tid("<think>"), *tok.encode("\n\n"), tid("</think>"), *tok.encode("\n\n")],
            True: header + [tid("<think>"), *tok.encode("\n")]}
    assert len(want[False]) == 7 and len(want[True]) == 5  # ...151644, 77091, 198, 151667, 271, 151668, 271
    for thinking in (False, True):
        cm, fake = _scripted(tok, "ok")
        cm.chat(msgs, images=[_img()], thinking=thinking, temperature=0)
        ids = fake.prompts[-1][0].tolist()
        assert ids[-len(want[thinking]):] == want[thinking]
        assert ids[:3] == [tid("<|im_start|>"), *tok.encode("user"), *tok.encode("\n")]


def test_images_without_markers_go_before_the_last_user_message(tok):
    cm, fake = _scripted(tok, "ok")
    msgs = [{"role": "user", "content": "First"}, {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "Describe"}]
    cm.chat(msgs, images=[_img()], temperature=0)
    text = tok.decode(fake.prompts[-1][0])
    assert text.count("<image>") == 1
    assert text.index("Sure.") < text.index("<image>") < text.index("Describe")


def test_multi_turn_drops_old_reasoning(tok):
    for turn in ({"role": "assistant", "content": "Four.", "reasoning_content": "SECRET PLAN"},
                 {"role": "assistant", "content": "<think>\nSECRET PLAN\n</think>\n\nFour."}):
        cm, fake = _scripted(tok, "ok")
        cm.chat([{"role": "user", "content": "2+2?"}, turn, {"role": "user", "content": "And 3+3?"}],
                thinking=True, temperature=0)
        text = tok.decode(fake.prompts[-1][0])
        assert "SECRET" not in text and "Four.<|im_end|>" in text and text.endswith("assistant\n<think>\n")


# ---- reasoning / answer split ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, thinking, want", [
    ("step 1\nstep 2\n</think>\n\nThe answer.", True, ("step 1\nstep 2", "The answer.", False)),
    ("a</think>b</think>c", True, ("a", "bc", False)),  # first </think> splits; a stray one never reaches answer
    ("\nstill thinking\n\n", True, ("still thinking", "", True)),  # unclosed: all reasoning
    ("Plain answer.", False, ("", "Plain answer.", False)),
    ("Stray</think> tag", False, ("", "Stray tag", False)),  # short mode: no </think> in the answer
    ("\n<think>\nhm\n</think>\n\nYes", False, ("hm", "Yes", False)),  # short mode, the model opened a block
    ("", True, ("", "", True)),
])
def test_split_output(text, thinking, want):
    assert split_output(text, thinking) == want


def test_stable_split_never_takes_back_text():
    """Deltas of the stable split over every prefix, then the final split's remainder, rebuild the final split."""
    pieces = ["<think>", "</think>", "\n", "\n\n", "a", " b", "<", "</", "th", "ink>", "é", "<think", "x"]
    rng = random.Random(0)
    for _ in range(3000):
        thinking = rng.random() < 0.5
        text, sent_r, sent_a = "", "", ""
        for _ in range(rng.randint(0, 10)):
            text += rng.choice(pieces)
            r, a, _ = stable_split(text, thinking)
            assert r.startswith(sent_r) and a.startswith(sent_a), (text, thinking)
            sent_r, sent_a = r, a
        r, a, _ = split_output(text, thinking)
        assert r.startswith(sent_r) and a.startswith(sent_a), (text, thinking)


def test_scripted_long_mode_split_and_stream(tok):
    cm, _ = _scripted(tok, "Let me see.\nOK.\n</think>\n\nIt is red.")
    res = cm.chat("Q?", thinking=True, temperature=0)
    assert (res.reasoning, res.answer, res.finish_reason) == ("Let me see.\nOK.", "It is red.", "stop")
    assert res.text == "Let me see.\nOK.\n</think>\n\nIt is red."
    chunks, text, reasoning, answer = _collect(_scripted(tok, res.text)[0].chat("Q?", thinking=True, stream=True,
                                                                                temperature=0))
    assert (text, reasoning, answer) == (res.text, res.reasoning, res.answer)
    flags = [c.is_reasoning for c in chunks if c.reasoning or c.answer]
    assert flags == sorted(flags, reverse=True) and flags[0] and not flags[-1]  # reasoning first, then answer
    assert all(not c.answer for c in chunks if c.is_reasoning)


def test_scripted_short_mode_and_unclosed_block(tok):
    res = _scripted(tok, "Red.</think>")[0].chat("Q?", temperature=0)
    assert (res.reasoning, res.answer) == ("", "Red.") and "</think>" not in res.answer
    cm, _ = _scripted(tok, "thinking and thinking and thinking", end=False)
    res = cm.chat("Q?", thinking=True, max_new_tokens=4, temperature=0)
    assert res.finish_reason == "length" and res.answer == "" and res.reasoning == res.text.strip("\n")
    assert res.usage.completion_tokens == 4


def test_stream_never_splits_a_utf8_character(tok):
    text = "é😀 naïve ✓"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte-level pieces: some characters span several tokens
    chunks, streamed, _, answer = _collect(_scripted(tok, text)[0].chat("Q?", stream=True, temperature=0))
    assert all("\ufffd" not in c.text and "\ufffd" not in c.answer for c in chunks)
    assert streamed == answer == text == chunks[-1].result.text


def test_think_budget_through_the_api(tok):
    cm, _ = _scripted(tok, "a b c d e f g h", end=False)
    res = cm.chat("Q?", thinking=True, think_budget=3, max_new_tokens=12, temperature=0)
    assert res.token_ids[:3] == tok.encode("a b c")
    assert res.text.startswith("a b c\n</think>\n\n") and res.reasoning == "a b c"


# ---- real tiny model: streaming == non-streaming, batch == single -------------------------------------------------
@pytest.mark.parametrize("kw", [dict(seed=3), dict(seed=4, thinking=True, think_budget=4),
                                dict(temperature=0, repetition_penalty=1.2)])
def test_stream_equals_non_stream(tiny, tok, kw):
    msgs = [{"role": "user", "content": [_img(1), "What is this?"]}]
    res = tiny.chat(msgs, max_new_tokens=12, **kw)
    chunks, text, reasoning, answer = _collect(tiny.chat(msgs, max_new_tokens=12, stream=True, **kw))
    assert (text, reasoning, answer) == (res.text, res.reasoning, res.answer)
    assert res.text == tok.decode(res.token_ids) and chunks[-1].result.token_ids == res.token_ids
    assert chunks[-1].usage == res.usage and res.usage.visual_tokens == 8
    assert res.usage.prompt_tokens == tiny.count_tokens(msgs, thinking=kw.get("thinking", False)).total


def test_chat_batch_equals_single(tiny):
    reqs = [dict(messages="Hi", seed=1, max_new_tokens=6),
            dict(messages=[{"role": "user", "content": [_img(2), "Describe this image in detail"]}], seed=2,
                 thinking=True, max_new_tokens=9),
            dict(messages="Another question", temperature=0, max_new_tokens=4)]
    batched = tiny.chat_batch(reqs)
    for req, b in zip(reqs, batched):
        single = tiny.chat(**req)
        assert (b.token_ids, b.text, b.reasoning, b.answer) == \
            (single.token_ids, single.text, single.reasoning, single.answer)
        assert b.usage == single.usage


def _write_video(path, seconds=2, fps=10, w=64, h=48):
    from PIL import Image

    from vlmcook.data.synth_video import encode_mp4

    frames = [Image.new("RGB", (w, h), (i * 10 % 256,) * 3) for i in range(seconds * fps)]
    path.write_bytes(encode_mp4(frames, fps, codec="mpeg4"))
    return path


def test_video_knobs_apply_to_items_without_their_own(tiny, tmp_path):
    video = str(_write_video(tmp_path / "v.mp4"))
    msgs = [{"role": "user", "content": [{"type": "video", "video": video}, "What happens?"]}]
    Q = tiny.model.config.query_num
    # 2 s at fps=5 -> 10 frames; packing p -> ceil(10 / p) packages of Q tokens each
    for packing, packages in ((1, 10), (2, 5), (3, 4)):
        assert tiny.count_tokens(msgs, fps=5, packing=packing).visual_tokens == packages * Q
    own = [{"role": "user", "content": [{"type": "video", "video": video, "packing": 5}, "What happens?"]}]
    assert tiny.count_tokens(own, fps=5, packing=1).visual_tokens == 2 * Q
    res = tiny.chat(msgs, fps=5, packing=2, max_new_tokens=2, temperature=0)
    assert res.usage.visual_tokens == 5 * Q


# ---- loading and errors --------------------------------------------------------------------------------------------
def test_load_folder_and_tokenizer_choice(tiny, tok, tmp_path, monkeypatch):
    save_model(tiny.model, tmp_path / "plain")
    loaded = ChatModel.load(tmp_path / "plain")
    assert loaded.tokenizer.vocab_size == 512 and loaded.model.llm.lm_head.weight.dtype == torch.float32
    a = loaded.chat("Hi there", temperature=0, max_new_tokens=5)
    assert a.token_ids == tiny.chat("Hi there", temperature=0, max_new_tokens=5).token_ids
    save_model(tiny.model, tmp_path / "withtok", tokenizer=tok)
    assert ChatModel.load(tmp_path / "withtok").tokenizer.source.startswith(str(tmp_path / "withtok"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"runs/demo/model.*make demo"):
        ChatModel.load()
    cfg = PRESETS["tiny"]
    import dataclasses
    big_vocab = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=600))
    save_model(MiniCPMV(big_vocab), tmp_path / "vocab600")
    with pytest.raises(FileNotFoundError, match="vocab_size 600 does not match"):
        ChatModel.load(tmp_path / "vocab600")


def test_errors(tiny):
    with pytest.raises(ValueError, match="think_budget only applies with thinking=True"):
        tiny.chat("Hi", think_budget=5)
    with pytest.raises(ValueError, match="SamplingParams.temperature"):
        tiny.chat("Hi", temperature=-0.5)
    with pytest.raises(ValueError, match="SamplingParams.max_new_tokens"):
        tiny.chat("Hi", max_new_tokens=0, stream=True)  # raised at the call, not on first iteration
    with pytest.raises(ValueError, match="thinking must be True or False"):
        tiny.chat("Hi", thinking="yes")
    with pytest.raises(ValueError, match="messages must be"):
        tiny.chat([])
    with pytest.raises(TypeError, match=r"chat_batch request 1: .*unexpected keyword argument 'tempreature'"):
        tiny.chat_batch([dict(messages="a"), dict(messages="b", tempreature=0)])
    with pytest.raises(ContextLengthError, match="the prompt is .* more than the"):
        tiny.chat("word " * 5000)
    n = tiny.count_tokens("Hi").total
    ctx = tiny.engine.context_length
    with pytest.raises(ContextLengthError, match=f"more than the {ctx - (ctx - n + 1)} tokens"):
        tiny.chat("Hi", max_new_tokens=ctx - n + 1)  # an explicit budget that does not fit is an error
    assert tiny.chat("Hi", max_new_tokens=ctx - n, temperature=0).usage.prompt_tokens == n


def test_max_new_tokens_beyond_the_context_says_so(tiny):
    """An answer budget the context cannot hold is refused by name (it used to read 'more than the -999995904
    tokens'); one that fits with a long prompt still gets the exact ContextLengthError."""
    ctx = tiny.engine.context_length
    for n in (ctx, 10**9):
        with pytest.raises(ValueError, match=f"max_new_tokens={n} leaves no room for the prompt: the model's "
                                             f"context is {ctx} tokens"):
            tiny.chat("Hi", max_new_tokens=n)
    with pytest.raises(ContextLengthError, match=f"{ctx - (ctx - 2)} tokens \\({ctx} minus {ctx - 2} reserved"):
        tiny.chat("Hi there, a prompt longer than two tokens", max_new_tokens=ctx - 2)
