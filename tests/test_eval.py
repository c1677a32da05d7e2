"""vlmcook.eval: metric functions against hand-computed values and an independent brute-force oracle; the 3D-vs-2D
token-budget arithmetic against the real video planner."""

import functools
import random

import pytest

from vlmcook.data.video import VideoInfo, plan_frames
from vlmcook.eval.metrics import accuracy, cer, edit_distance, normalize_answer, wilson_interval
from vlmcook.eval.ocr import sample_level
from vlmcook.eval.video_qa import chance, paired_difference


def _lev_oracle(a: str, b: str) -> int:
    """Textbook recursive definition (memoised): an independent implementation of the Levenshtein distance."""
    @functools.lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


@pytest.mark.parametrize("a,b,want", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3),
                                      ("abc", "", 3), ("abc", "abc", 0), ("ab", "ba", 2)])
def test_edit_distance_hand_values(a, b, want):
    assert edit_distance(a, b) == want


def test_edit_distance_matches_recursive_oracle():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        assert edit_distance(a, b) == _lev_oracle(a, b), (a, b)


def test_cer_hand_values():
    assert cer("helo world", "hello world") == pytest.approx(1 / 11)  # one deletion in 11 reference characters
    assert cer("abcd", "a") == pytest.approx(3.0)  # insertions count: CER can exceed 1
    assert cer("", "abcd") == pytest.approx(1.0)
    assert cer("a  b\nc", "a b c") == 0.0  # whitespace runs are collapsed (line wrapping is not an error)
    # corpus CER = total edits / total reference characters: (0 + 3) / (2 + 3), not the mean of 0 and 1
    assert cer(["ab", "xyz"], ["ab", "abc"]) == pytest.approx(3 / 5)


def test_cer_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        cer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no characters"):
        cer("a", "   ")
    with pytest.raises(TypeError):
        cer("a", ["a"])


def test_accuracy_and_normalisation():
    assert normalize_answer("  Red.\n") == "red"
    assert accuracy(["Red.", " blue", "3", "left!"], ["red", "green", "3", "right"]) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="3 predictions for 2 answers"):
        accuracy(["a", "b", "c"], ["a", "b"])


def test_wilson_interval_table_values():
    # Published values of the 95% Wilson score interval (z = 1.96).
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@pytest.mark.parametrize("packing", [1, 2, 3, 4, 6])
def test_one_package_per_second_is_an_equal_budget(packing):
    """The sweep's premise, on the real planner: fps = packing gives one package per second of video whatever the
    packing (equal visual tokens), packing frames in each, spread over the whole clip."""
    info = VideoInfo(source="x", width=112, height=112, fps=6.0, n_frames=48, duration=8.0)
    plan = plan_frames(info, fps=float(packing), packing=packing, query_num=16)
    assert len(plan.packages) == 8 and len(plan.frame_indices) == 8 * packing
    assert all(int(plan.timestamps[i]) == i // packing for i in range(len(plan.timestamps)))  # package j = second j


def test_paired_difference():
    """Paired on the same questions: a model right on 7 of 10 where the other is right on 4 (3 more right, none
    fewer) -> +0.3 with sd 0.483 -> half-width 1.96 * 0.483 / sqrt(10) = 0.299."""
    a = [True] * 7 + [False] * 3
    b = [True] * 4 + [False] * 6
    r = paired_difference(a, b)
    assert r["diff"] == pytest.approx(0.3) and r["n"] == 10
    assert r["ci95"][0] == pytest.approx(0.3 - 1.96 * 0.48304589 / 10 ** 0.5, abs=1e-6)
    assert paired_difference(b, b)["ci95"] == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference(a, b[:3])


def test_sample_level_is_most_severe_region():
    meta = {"regions": [{"level": "low"}, {"level": None}, {"level": "high"}, {"level": "medium"}]}
    assert sample_level(meta) == "high"
    assert sample_level({"regions": [{"level": None}]}) == "clean"


def test_chance_level():
    # count: 5 answers, motion: 4 directions
    assert chance(["count", "motion"]) == pytest.approx((1 / 5 + 1 / 4) / 2)
