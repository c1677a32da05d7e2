"""The official scoring rules of `vlmcook eval`, each pinned on hand cases worked out from the rule's definition
(VLMEvalKit's can_infer and circular evaluation, OCRBench's matching and groups, ANLS as the RRC script computes
it, VQA accuracy's leave-one-out average and answer normalisation, Video-MME's letter extraction, the JSONL
verifiers). No model, no files."""

import pytest

from vlmcook.eval.tasks.common import Item, group_means
from vlmcook.eval.tasks.jsonl import JsonlTask
from vlmcook.eval.tasks.mcq import MmbenchTask, MmmuTask, extract_choice, infer_option, infer_text
from vlmcook.eval.tasks.ocrbench import GROUPS, HME, OcrBenchTask, ocrbench_hit
from vlmcook.eval.tasks.videomme import extract_letter
from vlmcook.eval.tasks.vqa import anls, normalize_vqa, vqa_accuracy

CHOICES = {"A": "red", "B": "green", "C": "blue"}


# ---- multiple choice: VLMEvalKit can_infer -------------------------------------------------------------------------
@pytest.mark.parametrize("answer, want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("[C]", "C"), ("**A**", "A"),
    ("The answer is B.", "B"),  # 4 tokens, B is the last: within the last 5
    ("B. green", "B"),
    ("A cat", "A"),  # "A" as an article still counts (VLMEvalKit only warns about it in verbose mode)
    ("Z", "Z"),  # no option letter but a Z token
    ("Cannot determine the answer", "Z"),  # a refusal phrase
])
def test_option_letter_tokens(answer, want):
    assert infer_option(answer, CHOICES) == want
    assert extract_choice(answer, CHOICES) == want


def test_letter_must_be_among_the_last_five_tokens():
    long = "B is the one because the colour looks green to me"  # 11 tokens, B first
    assert infer_option(long, CHOICES) is None
    assert infer_option("I pick B", CHOICES) == "B"  # 3 tokens: index 2 > 3 - 5
    # too long for the text rule either (len 50 > 2 * (3 + 5 + 4) = 24): no answer
    assert extract_choice(long, CHOICES) == "Z"


@pytest.mark.parametrize("answer, want", [
    ("A B", "Z"),  # two letters: ambiguous, and no option text inside
    ("b", "Z"),  # letters are matched case-sensitively; "b" holds no option text
    ("It is green", "B"),  # no letter token; exactly one option text in the (short) answer
    ("red or green", "Z"),  # two option texts
])
def test_text_rule_and_failures(answer, want):
    assert extract_choice(answer, CHOICES) == want


def test_text_rule_length_guard():
    assert infer_text("green " * 4, CHOICES) == "B"  # 24 characters = 2 * 12: allowed
    assert infer_text("green " * 4 + "x", CHOICES) is None  # 25 > 24


def test_mmbench_circular_groups():
    def rec(i, score, error=None):
        return {"id": str(i), "g_index": i % 1_000_000, "score": score, "error": error, "category": "c"}
    records = [rec(0, 1.0), rec(1_000_000, 1.0), rec(2_000_000, 1.0),  # all copies right: counts
               rec(1, 1.0), rec(1_000_001, 0.0),  # one copy wrong: the question is wrong
               rec(2, 1.0), rec(1_000_002, 0.0, error="bad image")]  # an errored copy: wrong, and counted
    s = MmbenchTask().aggregate(records)
    assert (s["n"], s["rows"], s["errors"], s["row_errors"]) == (3, 7, 1, 1)
    assert s["overall"] == pytest.approx(100 / 3)


def test_mmbench_limit_keeps_whole_groups():
    items = [Item(str(i), {}, {"g_index": i % 1_000_000}) for i in (0, 1, 1_000_000, 1_000_001, 2)]
    kept = MmbenchTask().limit(items, 1)
    assert [it.id for it in kept] == ["0", "1000000"]


def test_mmmu_open_question_becomes_two_choices():
    task = MmmuTask()
    row = {"question": "How many?", "answer": "5"}  # no option columns: an open question
    assert task.choices(row) == {"A": "5", "B": "Other Answers"} and task.truth(row) == "A"
    assert task.score(Item("0", row), "5")["score"] == 1.0  # the answer text, short enough -> A
    assert task.score(Item("0", row), "6")["score"] == 0.0
    assert task.truth({"answer": "C", "A": "x"}) == "C"


# ---- OCRBench -------------------------------------------------------------------------------------------------------
def test_ocrbench_matching():
    assert ocrbench_hit("The word is centre.", ["CENTRE"], "Regular Text Recognition")  # lower-cased substring
    assert not ocrbench_hit("enemy", ["FRIEND"], "Irregular Text Recognition")
    assert ocrbench_hit("hello\nworld", ["hello world"], "Doc-oriented VQA")  # newline -> space
    assert ocrbench_hit("no", ["yes", "no"], "Scene Text-centric VQA")  # any answer of the list
    assert ocrbench_hit("x ^ {2}", ["x^{2}"], HME)  # HME: spaces removed
    assert not ocrbench_hit("X^{2}", ["x^{2}"], HME)  # ... and case kept


def test_ocrbench_five_groups():
    assert len(GROUPS) == 10 and len(set(GROUPS.values())) == 5
    cats = ["Regular Text Recognition", "Digit String Recognition", "Doc-oriented VQA", HME]
    records = [{"group": GROUPS[c], "score": 1.0, "error": None} for c in cats]
    records.append({"group": None, "score": 0.0, "error": "unknown category"})
    s = OcrBenchTask().aggregate(records)
    assert s["overall"] == 4 and s["n"] == 5 and s["errors"] == 1
    assert s["by"]["group"]["Text Recognition"] == {"score": 2, "n": 2}
    assert s["by"]["group"]["Key Information Extraction"] == {"score": 0, "n": 0}


# ---- ANLS and VQA accuracy -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, answers, want", [
    ("hello", ["hello"], 1.0),
    ("helo", ["hello"], 0.8),  # NL = 1/5
    (" Hello  World ", ["hello world"], 1.0),  # case and whitespace folded
    ("ac", ["ab"], 0.5),  # NL = 0.5 exactly: the RRC script keeps 1 - NL (not < 0.5)
    ("abcd", ["abxy"], 0.5),
    ("abc", ["axy"], 0.0),  # NL = 2/3: below the threshold
    ("cat", ["dog", "cat"], 1.0),  # best reference
    ("", ["a"], 0.0),
    ("", [""], 1.0),  # both empty: NL 0
])
def test_anls(pred, answers, want):
    assert anls(pred, answers) == pytest.approx(want)


@pytest.mark.parametrize("k, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k, want):
    # 10 humans, k said "cat": mean over the 10 subsets of 9 of min(#cat / 3, 1)
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", answers) == pytest.approx(want)


@pytest.mark.parametrize("text, want", [
    ("Two dogs.", "2 dogs"),  # number word, final period
    ("The red car", "red car"),  # articles
    ("3.5", "3.5"),  # a period before a digit stays
    ("e.g.", "eg"),
    ("1,000", "1000"),  # a digit,digit comma: punctuation removed, not spaced
    ("hello-world", "hello world"),  # punctuation away from spaces -> a space
    ("hello - world", "hello world"),  # punctuation touching a space -> removed
    ("yes!", "yes"),
    ("dont", "don't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),  # contractions
    ("somebody'd", "somebodyd"),  # the table's backwards entry
    ("None", "0"),
    ("a\tb\nc", "b c"),  # tabs / newlines are spaces; "a" is an article
])
def test_vqa_normalisation(text, want):
    assert normalize_vqa(text) == want


def test_vqa_accuracy_uses_normalisation():
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0


# ---- Video-MME ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, want", [
    ("B", "B"), ("(D) the man", "D"), ("The best answer is C.", "C"),
    ("The correct answer is A", "A"),
    ("Answer: D", "A"),  # the official rule takes the first capital A-D anywhere: the A of "Answer"
    ("Based on the video, C", "B"),  # ... likewise
    ("i think it is the man in the hat who runs away quickly", ""),  # > 10 words, no capital A-D
    ("the man", ""),  # no capital A-D at all
    ("The best option isThe correct option is B", "B"),  # the script's concatenated prefix
])
def test_videomme_extraction(response, want):
    assert extract_letter(response) == want


# ---- generic JSONL verifiers ----------------------------------------------------------------------------------------
def _score(verifier, answer, reference, **row):
    item = Item("0", row, {"verifier": verifier, "answer": reference})
    return JsonlTask().score(item, answer)["score"]


def test_jsonl_verifiers():
    assert _score("number", "It is 12.4", "12.5", tolerance=0.2) == 1.0
    assert _score("number", "It is 12.4", "12.5") == 0.0
    assert _score("choice", "The answer is (C)", "C") == 1.0
    assert _score("string", "The Cat.", ["dog", "cat"]) == 1.0  # SQuAD normalisation, any reference
    assert _score("anls", "helo", "hello") == pytest.approx(0.8)
    assert _score("cer", "abcd", "abce") == pytest.approx(0.25)


def test_group_means_keeps_errors_in_the_denominator():
    recs = [{"score": 1.0, "error": None, "split": "dev"}, {"score": 0.0, "error": "x", "split": "dev"},
            {"score": 0.5, "error": None, "split": "test"}]
    g = group_means(recs, ("split", "category"))
    assert g["overall"] == pytest.approx(50.0) and (g["n"], g["errors"]) == (3, 1)
    assert g["by"] == {"split": {"dev": {"score": 50.0, "n": 2}, "test": {"score": 50.0, "n": 1}}}
