"""Reward components against hand-computed values; RLPR on a tiny model against an independent full-logits oracle."""

import math
from collections import Counter

import pytest
import torch

from vlmcook.config import PRESETS
from vlmcook.data import chat
from vlmcook.data.processor import Processor
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.rl import rewards as R
from vlmcook.rl.rollout import Completion, ContinuationScorer, Group, Task


def test_format_reward_catches_stray_and_missing_think():
    assert R.format_reward("12", long=False) == 0.0
    assert R.format_reward("12</think>", long=False) == -1.0  # stray close tag in short mode
    assert R.format_reward("<think>x", long=False) == -1.0
    assert R.format_reward("   ", long=False) == -1.0  # empty answer
    assert R.format_reward("3 + 4 = 7\n</think>\n\n7", long=True) == 0.0
    assert R.format_reward("3 + 4 = 7\n\n7", long=True) == -1.0  # never closes its think block
    assert R.format_reward("3 + 4 = 7</think>", long=True) == -1.0  # no answer after it
    assert R.format_reward("a</think>b</think>c", long=True) == -1.0  # two closes
    assert R.format_reward("<think>a</think>b", long=True) == -1.0  # re-opens (the prompt already opened it)
    assert R.format_reward("\n</think>\n\n7", long=True) == -1.0  # empty thinking


def test_split_completion():
    assert R.split_completion("r\n</think>\n\n 42 ", long=True) == ("r", "42", True)
    assert R.split_completion("still thinking", long=True) == ("still thinking", "", False)
    assert R.split_completion(" 42\n", long=False) == ("", "42", True)


def test_repetition_penalty_ten_word_windows():
    ten = " ".join(f"w{i}" for i in range(10))
    assert R.repetition_penalty(" ".join([ten] * 9)) == 0.0  # each 10-gram 9 times: under the limit of 10
    assert R.repetition_penalty(" ".join([ten] * 10)) == -1.0
    assert R.repetition_penalty("_".join([ten.replace(" ", "_")] * 10)) == -1.0  # '_' splits words too
    assert R.repetition_penalty("a b c", n=2, limit=2) == 0.0
    assert R.repetition_penalty("a b a b a b", n=2, limit=3) == -1.0  # "a b" occurs 3 times


def test_rule_verifiers():
    assert R.verify_number("so the total is 1,234.", "1234") == 1.0
    assert R.verify_number("it is 3.14", "3.1416", abs_tol=0.01) == 1.0
    assert R.verify_number("it is 3.14", "3.1416") == 0.0
    assert R.verify_number("no idea", "5") == 0.0
    assert R.verify_number("12 then 7", "7") == 1.0  # the last number counts
    with pytest.raises(ValueError, match="holds no number"):
        R.verify_number("5", "five")
    assert R.verify_choice("(B) because", "B") == 1.0
    assert R.verify_choice("b.", "(B)") == 1.0
    assert R.verify_choice("I think the answer is C", "C") == 1.0
    assert R.verify_choice("D", "C") == 0.0
    assert R.verify_choice("I do not know", "I") == 0.0  # a pronoun, not option I
    assert R.verify_choice("A cat", "A") == 0.0
    assert R.verify_string("The Eiffel tower!", "eiffel tower") == 1.0
    assert R.verify_string("tower", ["eiffel tower", "Tower"]) == 1.0
    assert R.verify_string("towers", "tower") == 0.0


def test_anls_hand_values():
    assert R.anls("hello", "hello") == 1.0
    assert R.anls("helo", "hello") == pytest.approx(1 - 1 / 5)  # lev 1, max len 5
    assert R.anls("abc", "xyz") == 0.0  # NL = 1 >= 0.5
    assert R.anls("Hello ", ["bye", "hello"]) == 1.0  # case, trim, max over references
    assert R.edit_distance("kitten", "sitting") == 3


def test_concise_preference():
    s = R.concise_preference(["q"] * 3, ["7", "7 7 7 7", ""])
    assert s[0] == pytest.approx(1 - 0.1 * math.log2(2))
    assert s[1] == pytest.approx(0.25 - 0.1 * math.log2(5))
    assert s[2] == -1.0


def _group(texts, long, verifier="number", answer="7"):
    task = Task("t", [{"role": "user", "content": "q"}], answer, verifier)
    return Group(task, long, {}, [Completion([1] * max(len(t), 1), t, False) for t in texts])


def test_composite_hand_values():
    # short group: "7" right, "8" wrong, "7</think>" right answer but malformed
    g = _group(["7", "8", "7</think>"], long=False)
    rm = lambda prompts, answers: [1.0, 2.0, 3.0]  # noqa: E731 - z over the group: [-1.2247, 0, 1.2247]
    out, issues = R.composite_rewards([g], rm=rm)
    assert out["acc"][0].tolist() == [1.0, 0.0, 1.0]
    assert out["format"][0].tolist() == [0.0, 0.0, -1.0]
    z = math.sqrt(1.5)
    assert out["rm_z"][0].tolist() == pytest.approx([-z, 0.0, z], abs=1e-5)
    assert out["total"][0].tolist() == pytest.approx([1 - 0.5 * z, 0.0, 0.5 * z], abs=1e-5)


def test_rm_sees_answer_only_in_long_mode():
    seen = []
    g = _group(["secret reasoning\n</think>\n\n7", "more secret</think>8"], long=True)
    R.composite_rewards([g], rm=lambda p, a: seen.extend(a) or [0.0] * len(a))
    assert seen == ["7", "8"]


def test_bad_inputs_get_defined_rewards_and_are_counted():
    g = _group(["", "never closes", "x</think>7"], long=True)
    bad_rm = lambda p, a: [float("nan"), 1.0, "oops"]  # noqa: E731
    out, issues = R.composite_rewards([g], rm=bad_rm)
    assert torch.isfinite(out["total"]).all()
    assert issues["empty_completion"] == 1 and issues["unclosed_think"] == 2  # "" never closes either
    assert issues["rm_nan"] == 1 and issues["rm_not_a_number"] == 1
    assert out["rm_z"][0].tolist() == [0.0, 0.0, 0.0]  # one valid score: z = 0
    assert out["acc"][0].tolist() == [0.0, 0.0, 1.0]

    def raising(p, a):
        raise RuntimeError("RM server down")
    out, issues = R.composite_rewards([_group(["7", "8"], long=False)], rm=raising)
    assert issues["rm_error"] == 2 and out["rm_z"].abs().sum() == 0
    assert out["total"][0].tolist() == [1.0, 0.0]
    out, issues = R.composite_rewards([_group(["7", "8"], long=False, verifier="mystery")])
    assert issues["unverifiable"] == 2 and out["acc"].sum() == 0
    out, issues = R.composite_rewards([_group(["7", "8"], long=False, answer="seven")])  # reference not a number
    assert issues["verifier_error"] == 2 and out["acc"].sum() == 0
    out, issues = R.composite_rewards([_group(["7", "8"], long=False, verifier="prob")], rlpr=None)
    assert issues["unverifiable"] == 2


# ---- RLPR on a tiny model -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MiniCPMV(PRESETS["tiny"]).eval()
    tok = Tokenizer.tiny()
    return model, tok, Processor(tok, model.config)


def _oracle_mean_prob(model, ids: list[int], start: int) -> float:
    """Mean over ids[start:] of p(id_t | ids_<t), from the model's full-sequence logits (independent path)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    probs = torch.softmax(logits.float(), -1)
    return sum(float(probs[t - 1, ids[t]]) for t in range(start, len(ids))) / (len(ids) - start)


def test_splice_reference(tiny):
    _, tok, _ = tiny
    ref = tok.encode("19")
    done = tok.encode("12 + 7\n</think>\n\nwrong answer") + [tok.im_end_id]
    prefix, target = R.splice_reference(done, ref, tok, long=True)
    assert tok.decode(prefix) == "12 + 7\n</think>\n\n"  # the sample's reasoning, then the separator
    assert target == ref + [tok.im_end_id]
    prefix, _ = R.splice_reference(tok.encode("12 + 7 and"), ref, tok, long=True)
    assert tok.decode(prefix) == "12 + 7 and\n</think>\n\n"  # unclosed: closed for it, then spliced
    assert R.splice_reference(tok.encode("9"), ref, tok, long=False)[0] == []


def test_rlpr_matches_full_logits_oracle_and_subtracts_baseline(tiny):
    model, tok, proc = tiny
    task = Task("p1", [{"role": "user", "content": "What is 12 + 7?"}], "19", "prob")
    rlpr = R.RLPR(ContinuationScorer(model), tok, proc)
    # baseline: the short-mode prompt (empty think block) followed by the reference and <|im_end|>
    short_ids = tok.encode(chat.render(task.messages, thinking=False))
    target = tok.encode("19") + [tok.im_end_id]
    rlpr.precompute([task])
    base = _oracle_mean_prob(model, short_ids + target, len(short_ids))
    assert rlpr.baselines["p1"] == pytest.approx(base, abs=1e-5)
    # PR of a long-mode sample: its reasoning is kept, the reference replaces its answer
    long_prompt = proc(task.messages, thinking=True)
    sample = tok.encode("add them\n</think>\n\n20") + [tok.im_end_id]
    g = Group(task, True, long_prompt, [Completion(sample, "add them\n</think>\n\n20", False)])
    spliced = long_prompt["input_ids"][0].tolist() + tok.encode("add them\n</think>\n\n") + target
    pr = _oracle_mean_prob(model, spliced, len(spliced) - len(target))
    got = rlpr.score([(g, g.completions[0])])[0]
    assert got == pytest.approx(max(0.0, pr - base), abs=1e-5)
    # the floor at 0: a baseline above PR gives exactly 0
    rlpr.baselines["p1"] = pr + 0.1
    assert rlpr.score([(g, g.completions[0])]) == [0.0]
    rlpr.baselines["p1"] = pr - 0.25
    assert rlpr.score([(g, g.completions[0])])[0] == pytest.approx(0.25, abs=1e-5)


def test_rlpr_in_composite_counts_failures(tiny):
    model, tok, proc = tiny
    task = Task("p2", [{"role": "user", "content": "Say 3"}], "3", "prob")
    g = Group(task, True, proc(task.messages, thinking=True), [Completion([5, 6], "ab", False)] * 2)

    class Broken:
        def score(self, items):
            raise RuntimeError("boom")
    out, issues = R.composite_rewards([g], rlpr=Broken())
    assert issues["rlpr_error"] == 2 and out["acc"].sum() == 0
    out, issues = R.composite_rewards([g], rlpr=R.RLPR(ContinuationScorer(model), tok, proc))
    assert torch.isfinite(out["acc"]).all() and (out["acc"] >= 0).all()
    assert Counter(issues)["unclosed_think"] == 2


def test_rlpr_reference_is_text_not_control_tokens(tiny):
    """A reference answer spelling a control token ("<|im_end|>") is scored as those characters: encoded as special
    tokens it would put a stop inside the target and score the wrong continuation."""
    model, tok, proc = tiny
    task = Task("p3", [{"role": "user", "content": "Quote the end tag"}], "<|im_end|>", "prob")
    rlpr = R.RLPR(ContinuationScorer(model), tok, proc)
    assert rlpr._reference(task) == tok.encode_text("<|im_end|>") != [tok.im_end_id]
    short_ids = tok.encode(chat.render(task.messages, thinking=False))
    target = tok.encode_text("<|im_end|>") + [tok.im_end_id]
    rlpr.precompute([task])
    assert rlpr.baselines["p3"] == pytest.approx(_oracle_mean_prob(model, short_ids + target, len(short_ids)), abs=1e-5)
