"""Chat format: equal to the released Jinja chat_template over many message lists; docs/reference.md 8.2 /
11.15 strings; SFT label masks checked against hand-derived supervised text."""

import json
import random

import pytest

from vlmcook.data import chat
from vlmcook.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def jinja_template(reference_dir):
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers compiles templates
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, **kw)
    source = json.loads((reference_dir / "tokenizer_config.json").read_text())["chat_template"]
    return env.from_string(source)


def _jinja(template, messages, add_generation_prompt, thinking):
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


PIECES = ["Hello", "What is in the image?", "(<image>./</image>)\nDescribe it.", "line one\nline two", "", "\n",
          "\n\nleading newlines", "trailing newlines\n\n", "中文内容", "  spaced  ",
          "<tool_response>r</tool_response>"]
ANSWERS = ["Sure.", "<think>\nreasoning here\n</think>\n\nThe answer.", "<think>plan</think>answer",
           "pre<think>a</think>\n\npost", "</think>only closing", "<think>\n\n</think>\n\nempty think", "",
           "\nleading", "a</think>b</think>c", "<think>x\n\n</think>"]


def _random_conversation(rng: random.Random) -> list[dict]:
    msgs = []
    if rng.random() < 0.4:
        msgs.append({"role": "system", "content": rng.choice(["You are helpful.", "", "Be brief.\nReally."])})
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": rng.choice(PIECES)})
        if rng.random() < 0.15:
            msgs.append({"role": "tool", "content": rng.choice(PIECES)})
            if rng.random() < 0.5:
                msgs.append({"role": "tool", "content": "second tool output"})
        if rng.random() < 0.8:
            m = {"role": "assistant", "content": rng.choice(ANSWERS)}
            r = rng.random()
            if r < 0.15:
                m["reasoning_content"] = rng.choice(["explicit reasoning", "", "\nnl\n"])
            elif r < 0.2:
                m["reasoning_content"] = None
            msgs.append(m)
        if rng.random() < 0.1:
            msgs.append({"role": "system", "content": "mid-conversation system"})
    return msgs


def test_render_equals_released_jinja_template(jinja_template):
    rng = random.Random(0)
    n = 0
    for _ in range(600):
        msgs = _random_conversation(rng)
        for gen in (True, False):
            for thinking in (True, False, None):
                assert chat.render(msgs, gen, thinking) == _jinja(jinja_template, msgs, gen, thinking), (msgs, gen,
                                                                                                        thinking)
                n += 1
    assert n == 3600


def test_render_equals_jinja_fixed_cases(jinja_template):
    cases = [
        [{"role": "user", "content": "(<image>./</image>)\nWhat is this?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "<think>old reasoning</think>A1"}, {"role": "user", "content": "Q2"},
         {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"},
         {"role": "assistant", "content": "B"}],
        [{"role": "assistant", "content": "no user at all"}],
        [{"role": "user", "content": "<tool_response>x</tool_response>"}, {"role": "assistant", "content": "y"}],
    ]
    for msgs in cases:
        for gen in (True, False):
            for thinking in (True, False, None):
                assert chat.render(msgs, gen, thinking) == _jinja(jinja_template, msgs, gen, thinking)


def test_generation_prompts_vector_15():
    msgs = [{"role": "user", "content": "(<image>./</image>)\nWhat is this?"}]
    base = "<|im_start|>user\n(<image>./</image>)\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    assert chat.render(msgs, thinking=False) == base + "<think>\n\n</think>\n\n"
    assert chat.render(msgs, thinking=True) == base + "<think>\n"
    assert chat.render(msgs, thinking=None) == base
    assert chat.render(msgs, add_generation_prompt=False) == base[:-len("<|im_start|>assistant\n")]


def test_reasoning_dropped_before_last_query():
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>secret</think>\n\nA1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>kept</think>A2"}]
    text = chat.render(msgs, add_generation_prompt=False)
    assert "secret" not in text and "<|im_start|>assistant\nA1<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\nkept\n</think>\n\nA2<|im_end|>\n" in text


def test_render_rejects_what_the_template_would_silently_drop():
    with pytest.raises(ValueError, match="role 'robot'"):
        chat.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content must be a str"):
        chat.render([{"role": "user", "content": ["x"]}])
    with pytest.raises(ValueError, match="tool_calls"):
        chat.render([{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}])
    with pytest.raises(ValueError, match="no messages"):
        chat.render([])


# ---- labels -------------------------------------------------------------------------------------------------------
def _supervised_text(tok, ids, labels):
    """Decode each maximal run of supervised positions (labels equal to ids there)."""
    runs, cur = [], []
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if lab != chat.IGNORE_INDEX:
            assert lab == t, i
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def test_labels_supervise_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1?"},
            {"role": "assistant", "content": "Answer one."}, {"role": "user", "content": "Q2?"},
            {"role": "assistant", "content": "Answer two."}]
    ids = tok.encode(chat.render(msgs, add_generation_prompt=False))
    labels = chat.build_labels(ids, tok)
    assert len(labels) == len(ids)
    # last turn: the template's empty think block (4 tokens) is not supervised
    assert _supervised_text(tok, ids, labels) == ["Answer one.<|im_end|>", "Answer two.<|im_end|>"]


def test_labels_keep_real_reasoning(tok):
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>step 1</think>Final."}]
    ids = tok.encode(chat.render(msgs, add_generation_prompt=False))
    runs = _supervised_text(tok, ids, chat.build_labels(ids, tok))
    assert runs == ["<think>\nstep 1\n</think>\n\nFinal.<|im_end|>"]


def test_labels_only_the_last_turn_skips_its_empty_think(tok):
    # an earlier turn after the last query with an explicit empty think keeps it supervised (docs/reference.md 8.8:
    # the 4-token skip is for the last turn only)
    msgs = [{"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A", "reasoning_content": "r"},
            {"role": "assistant", "content": "B"}]
    ids = tok.encode(chat.render(msgs, add_generation_prompt=False))
    runs = _supervised_text(tok, ids, chat.build_labels(ids, tok))
    assert runs == ["<think>\nr\n</think>\n\nA<|im_end|>", "B<|im_end|>"]


def test_labels_with_released_tokenizer(reference_dir):
    tok = Tokenizer.from_dir(reference_dir)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids = tok.encode(chat.render(msgs, add_generation_prompt=False))
    labels = chat.build_labels(ids, tok)
    # ... <|im_start|> assistant \n <think> \n\n </think> \n\n Hello ! <|im_end|> \n
    assert ids[-11:] == [151644, 77091, 198, 151667, 271, 151668, 271, 9707, 0, 151645, 198]
    supervised = [t for t, lab in zip(ids, labels) if lab != -100]
    assert supervised == [9707, 0, 151645]  # "Hello" "!" <|im_end|>


def test_unfinished_assistant_turn_supervised_to_the_end(tok):
    ids = tok.encode("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\npartial")
    assert _supervised_text(tok, ids, chat.build_labels(ids, tok)) == ["partial"]

