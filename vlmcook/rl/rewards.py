"""Rewards as plain callables, and the composite R = R_acc + R_format + R_rep + w_rm * z_group(R_rm) (w_rm = 0.5).

Notable (docs/reference.md R4.2, R5; the report names R_format / R_rep without defining them: our reading is in
docs/architecture.md, "RL rewards"):
- Completions are the text generated after the template's prefill (long mode: `reasoning</think>answer`; short
  mode: just the answer).
- R_format in {0, -1}: one well-closed think block then a non-empty answer (long), no think tag and a non-empty
  answer (short). A penalty, not a bonus, so a correct well-formed answer scores R = 1 in both modes.
- R_acc: a rule verifier (number, choice letter, string, ANLS) on the *answer*, or RLPR's probability reward
  ("prob", floored at 0 after subtracting the no-reasoning baseline).
- R_rep (RLPR's rule): -1 if any 10-word window occurs >= `limit` (10) times, else 0.
- R_rm: any `(prompts, answers) -> scores` callable, answer only; z_group = z-score over the group's samples.
- Robustness: a callable that raises or returns NaN/inf, an empty completion, an unclosed think block, a task with
  no usable verifier all get a defined reward (0 for R_acc / the z-scored R_rm) and are counted in `issues`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlmcook.eval.metrics import edit_distance

THINK, END_THINK = "<think>", "</think>"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


# ---- splitting and format -------------------------------------------------------------------------------------
def split_completion(text: str, long: bool) -> tuple[str, str, bool]:
    """-> (reasoning, answer, closed). Long mode: reasoning is everything before the first `</think>` (all of it
    when the block never closes: then answer is ""). Short mode: the whole text is the answer."""
    if not long:
        return "", text.strip(), True
    if END_THINK not in text:
        return text.strip(), "", False
    head, _, answer = text.partition(END_THINK)
    return head.strip(), answer.strip(), True


def format_reward(text: str, long: bool) -> float:
    """0 if well formed for its mode, else -1 (see module docstring)."""
    if long:
        ok = (text.count(END_THINK) == 1 and THINK not in text and text.split(END_THINK)[0].strip() != ""
              and text.split(END_THINK)[1].strip() != "")
    else:
        ok = THINK not in text and END_THINK not in text and text.strip() != ""
    return 0.0 if ok else -1.0


def repetition_penalty(text: str, n: int = 10, limit: int = 10) -> float:
    """-1 if some n-word window occurs >= limit times (words split on whitespace and '_'), else 0."""
    words = [w for w in re.split(r"[\s_]+", text) if w]
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return -1.0 if max(counts.values()) >= limit else 0.0


# ---- rule verifiers: (answer, reference) -> score in [0, 1] ---------------------------------------------------------
def last_number(text: str) -> float | None:
    """The last number written in text ('1,234.5' -> 1234.5), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def verify_number(answer: str, reference: str, abs_tol: float = 0.0, rel_tol: float = 1e-6) -> float:
    """1 if the answer's last number is within max(abs_tol, rel_tol * |ref|) of the reference's, else 0."""
    got, want = last_number(answer), last_number(str(reference))
    if want is None:
        raise ValueError(f"verify_number: reference {reference!r} holds no number")
    if got is None:
        return 0.0
    return float(abs(got - want) <= max(abs_tol, rel_tol * abs(want)))


def choice_letter(text: str) -> str | None:
    """The chosen option letter: '... answer is (B)' / 'answer: B', else a text that is just 'B' / '(B)' / 'B.',
    else a leading '(B)', 'B.', 'B)' or 'B:'. A bare leading word ('I think', 'A cat') is never a choice."""
    m = re.search(r"answer\s*(?:is|:)\s*\(?([A-J])\b", text, flags=re.I)
    if m:
        return m.group(1).upper()
    m = re.match(r"\s*\(?([A-Ja-j])\)?[.:]?\s*$", text) or re.match(r"\s*(?:\(([A-Ja-j])\)|([A-Ja-j])[).:])", text)
    if m:
        return next(g for g in m.groups() if g).upper()
    return None


def verify_choice(answer: str, reference: str) -> float:
    want = choice_letter(str(reference))
    if want is None:
        raise ValueError(f"verify_choice: reference {reference!r} is not an option letter")
    return float(choice_letter(answer) == want)


def normalise(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles (a / an / the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def verify_string(answer: str, reference: str | Sequence[str]) -> float:
    refs = [reference] if isinstance(reference, str) else list(reference)
    return float(any(normalise(answer) == normalise(r) for r in refs))


def anls(answer: str, reference: str | Sequence[str]) -> float:
    """ANLS against one or several references: the DocVQA / RRC script's rule (vlmcook.eval.tasks.vqa.anls)."""
    from vlmcook.eval.tasks.vqa import anls as rrc_anls

    return rrc_anls(answer, [reference] if isinstance(reference, str) else list(reference))


VERIFIERS: dict[str, Callable] = {"number": verify_number, "choice": verify_choice, "string": verify_string,
                                  "anls": anls}


# ---- a preference scorer for R_rm ---------------------------------------------------------------------------------
def concise_preference(prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """A stand-in reward model (CPU, no weights). score = distinct-word ratio - 0.1 * log2(1 + words); an empty
    answer scores -1. It prefers short, non-repetitive answers and knows nothing about correctness: a shaping
    signal only (it enters R z-scored and at weight 0.5). Real RMs plug in with the same signature."""
    out = []
    for a in answers:
        words = a.split()
        out.append(-1.0 if not words else len(set(words)) / len(words) - 0.1 * math.log2(1 + len(words)))
    return out


# ---- RLPR probability reward --------------------------------------------------------------------------------------
def splice_reference(completion_ids: Sequence[int], reference_ids: Sequence[int], tokenizer, long: bool
                     ) -> tuple[list[int], list[int]]:
    """-> (prefix, target): the continuation to score is prefix + target, only target's tokens are averaged.
    Long mode: the sample's ids through its first `</think>`, then "\\n\\n" (the template's separator); an
    unclosed sample gets "\\n</think>\\n\\n" appended after its last token (RLPR splices anyway). Short mode:
    no prefix (the prompt's empty think block is the reasoning). target = reference ids + `<|im_end|>`."""
    target = list(reference_ids) + [tokenizer.im_end_id]
    if not long:
        return [], target
    ids = [i for i in completion_ids if i not in tokenizer.stop_ids]
    if tokenizer.think_end_id in ids:
        k = ids.index(tokenizer.think_end_id)
        return ids[:k + 1] + tokenizer.encode("\n\n"), target
    return ids + tokenizer.encode("\n</think>\n\n"), target


def mean_token_prob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLPR's scoreB: per row, mean over masked tokens of exp(logp); logp, mask [B, L] -> [B]."""
    mask = mask.to(logp.dtype)
    return (logp.exp() * mask).sum(1) / mask.sum(1).clamp(min=1)


class RLPR:
    """Probability reward. `score(groups_items)` -> max(0, PR - baseline) per item; baselines are cached per task id
    (call `precompute` with the initial policy before any update, as RLPR does)."""

    def __init__(self, scorer, tokenizer, processor, batch_rows: int = 32):
        self.scorer, self.tok, self.processor, self.batch_rows = scorer, tokenizer, processor, batch_rows
        self.baselines: dict[str, float] = {}

    def _reference(self, task) -> list[int]:
        ref = task.answer if isinstance(task.answer, str) else task.answer[0]
        return self.tok.encode_text(ref)  # data text: a "<|im_end|>" in a reference is characters, not a stop

    @torch.no_grad()
    def _probs(self, prompts: list[dict], prefixes: list[list[int]], targets: list[list[int]]) -> list[float]:
        out = []
        for k in range(0, len(prompts), self.batch_rows):
            sl = slice(k, k + self.batch_rows)
            conts = [p + t for p, t in zip(prefixes[sl], targets[sl])]
            logp, mask = self.scorer(prompts[sl], conts, self.tok.pad_id)
            only_target = mask.clone()
            for b, p in enumerate(prefixes[sl]):
                only_target[b, :len(p)] = False
            out += mean_token_prob(logp, only_target).tolist()
        return out

    def precompute(self, tasks) -> None:
        """Baseline (scoreA): the reference after the short-mode prompt (empty think block), once per task id."""
        todo = [t for t in tasks if t.verifier == "prob" and t.id not in self.baselines]
        prompts = [self.processor(t.messages, t.images, thinking=False) for t in todo]
        targets = [self._reference(t) + [self.tok.im_end_id] for t in todo]
        for t, p in zip(todo, self._probs(prompts, [[] for _ in todo], targets)):
            self.baselines[t.id] = p

    def score(self, items: list[tuple]) -> list[float]:
        """items: (group, completion) pairs -> max(0, PR - baseline)."""
        self.precompute([g.task for g, _ in items])
        spliced = [splice_reference(c.token_ids, self._reference(g.task), self.tok, g.long) for g, c in items]
        pr = self._probs([g.prompt for g, _ in items], [s[0] for s in spliced], [s[1] for s in spliced])
        return [max(0.0, p - self.baselines[g.task.id]) for (g, _), p in zip(items, pr)]


# ---- the composite ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardConfig:
    rm_weight: float = 0.5
    rep_ngram: int = 10
    rep_limit: int = 10


def _finite(x, issues: Counter, name: str) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        issues[f"{name}_not_a_number"] += 1
        return None
    if not math.isfinite(x):
        issues[f"{name}_nan"] += 1
        return None
    return x


def accuracy(task, answer: str, issues: Counter) -> float:
    """R_acc of one rule-verified answer; 0 (counted) when the verifier is missing, raises or returns NaN."""
    fn = VERIFIERS.get(task.verifier)
    if fn is None:
        issues["unverifiable"] += 1
        return 0.0
    try:
        score = fn(answer, task.answer, task.tolerance) if task.verifier == "number" else fn(answer, task.answer)
    except Exception:  # noqa: BLE001 - a broken verifier must not stop training; it is counted instead
        issues["verifier_error"] += 1
        return 0.0
    score = _finite(score, issues, "verifier")
    return 0.0 if score is None else score


def group_zscore(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x, valid [N, G] -> (x - mean) / (std + eps) over each row's valid entries (population std); invalid -> 0."""
    v = valid.to(x.dtype)
    n = v.sum(1, keepdim=True).clamp(min=1)
    mean = (x * v).sum(1, keepdim=True) / n
    std = (((x - mean) ** 2 * v).sum(1, keepdim=True) / n).sqrt()
    return torch.where(valid, (x - mean) / (std + eps), torch.zeros_like(x))


def _text(content) -> str:
    """The text of a message content (a str, or the strings / text items of a content list; visuals dropped)."""
    if isinstance(content, str):
        return content
    parts = [c if isinstance(c, str) else c.get("text", "") for c in content if isinstance(c, (str, dict))]
    return "\n".join(p for p in parts if p)


def _rm_scores(rm, groups, answers: list[list[str]], issues: Counter) -> tuple[torch.Tensor, torch.Tensor]:
    N, G = len(groups), len(answers[0]) if answers else 0
    raw, valid = torch.zeros(N, G), torch.zeros(N, G, dtype=torch.bool)
    for i, g in enumerate(groups):
        prompt = _text(g.task.messages[-1]["content"])
        try:
            scores = list(rm([prompt] * G, answers[i]))
            if len(scores) != G:
                raise ValueError(f"reward model returned {len(scores)} scores for {G} answers")
        except Exception:  # noqa: BLE001 - counted; the group's R_rm term is then 0
            issues["rm_error"] += G
            continue
        for j, s in enumerate(scores):
            s = _finite(s, issues, "rm")
            if s is not None:
                raw[i, j], valid[i, j] = s, True
    return raw, valid


def composite_rewards(groups, cfg: RewardConfig = RewardConfig(), rm=concise_preference, rlpr: RLPR | None = None
                      ) -> tuple[dict[str, torch.Tensor], Counter]:
    """groups (rollout.Group, each with G completions) -> ({acc, format, rep, rm, rm_z, total: [N, G]}, issues)."""
    issues: Counter = Counter()
    N, G = len(groups), len(groups[0].completions)
    acc, fmt, rep = torch.zeros(N, G), torch.zeros(N, G), torch.zeros(N, G)
    answers, prob_items = [], []
    for i, g in enumerate(groups):
        row = []
        for j, c in enumerate(g.completions):
            _, answer, closed = split_completion(c.text, g.long)
            issues["empty_completion"] += c.text.strip() == ""
            issues["unclosed_think"] += not closed
            issues["truncated"] += c.truncated
            fmt[i, j] = format_reward(c.text, g.long)
            rep[i, j] = repetition_penalty(c.text, cfg.rep_ngram, cfg.rep_limit)
            if g.task.verifier == "prob":
                prob_items.append((i, j))
            else:
                acc[i, j] = accuracy(g.task, answer, issues)
            row.append(answer)
        answers.append(row)
    if prob_items:
        _prob_rewards(acc, prob_items, groups, rlpr, issues)
    rm_raw, valid = _rm_scores(rm, groups, answers, issues) if rm is not None and cfg.rm_weight else \
        (torch.zeros(N, G), torch.zeros(N, G, dtype=torch.bool))
    rm_z = group_zscore(rm_raw, valid)
    total = acc + fmt + rep + cfg.rm_weight * rm_z
    return {"acc": acc, "format": fmt, "rep": rep, "rm": rm_raw, "rm_z": rm_z, "total": total}, issues


def _prob_rewards(acc: torch.Tensor, items: list[tuple[int, int]], groups, rlpr: RLPR | None,
                  issues: Counter) -> None:
    if rlpr is None:
        issues["unverifiable"] += len(items)
        return
    try:
        scores = rlpr.score([(groups[i], groups[i].completions[j]) for i, j in items])
    except Exception:  # noqa: BLE001 - counted; those samples get R_acc = 0
        issues["rlpr_error"] += len(items)
        return
    for (i, j), s in zip(items, scores):
        s = _finite(s, issues, "rlpr")
        acc[i, j] = 0.0 if s is None else s
