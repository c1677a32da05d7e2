"""Pure metric functions: edit distance, character error rate, exact-match accuracy, and token-budget arithmetic.

Notable:
- CER = Levenshtein(hypothesis, reference) / len(reference) over characters (insertions count, so CER can exceed
  1 for a long wrong output); `cer` of a corpus sums edits and reference lengths (long references weigh more), the
  standard corpus-level definition. Whitespace runs are collapsed first (line wrapping is not an OCR error here).
- Answers are compared after `normalize_answer` (lower case, surrounding punctuation / whitespace stripped): a
  one-word answer "Red." counts as "red".
"""

from __future__ import annotations

import math
import re
import string
from typing import Sequence


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit insert / delete / substitute), O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _squash(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def cer(hyps: str | Sequence[str], refs: str | Sequence[str]) -> float:
    """Character error rate of one (hyp, ref) pair, or of a corpus: sum of edits / sum of reference lengths."""
    if isinstance(hyps, str) != isinstance(refs, str):
        raise TypeError("cer: give two strings or two sequences of strings")
    if isinstance(hyps, str):
        hyps, refs = [hyps], [refs]
    if len(hyps) != len(refs):
        raise ValueError(f"cer: {len(hyps)} hypotheses for {len(refs)} references")
    edits = sum(edit_distance(_squash(h), _squash(r)) for h, r in zip(hyps, refs))
    chars = sum(len(_squash(r)) for r in refs)
    if chars == 0:
        raise ValueError("cer: the references hold no characters")
    return edits / chars


def normalize_answer(s: str) -> str:
    return s.strip().strip(string.punctuation + string.whitespace).lower()


def accuracy(preds: Sequence[str], answers: Sequence[str]) -> float:
    """Exact-match accuracy after `normalize_answer`."""
    if len(preds) != len(answers):
        raise ValueError(f"accuracy: {len(preds)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("accuracy: no answers")
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(preds, answers)) / len(answers)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (sound at 0 and n, unlike p +- z*SE)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n and n > 0, got k={k} n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
