"""Multiple choice in the VLMEvalKit TSV layout (MMStar, AI2D, SEED, ScienceQA, MMMU, ...) and MMBench's circular
evaluation, scored by VLMEvalKit's rule-based path (`exact_matching`, no LLM judge).

Extraction (VLMEvalKit vlmeval/utils/matching_util.py `can_infer`), in order:
1. a refusal phrase -> "Z"; else replace `.()[],:;!*#{}` by spaces and split on whitespace; exactly one option
   letter among the tokens -> that letter, if it is one of the last 5 tokens (current upstream; older releases had
   no position check); no option letter but a "Z" token -> "Z";
2. else, unless the answer is longer than twice the options' total length, the one option whose lower-cased
   text occurs in the lower-cased answer;
3. else "Z" (VLMEvalKit hands it to an LLM judge; without one it is wrong).
MMBench (`mmbench`): rows share a question when their `index` agree modulo 1e6 (the circular copies shift the
options); a question counts only if every copy is answered correctly. MMMU (`mmmu`): VLMEvalKit's MMMU_preproc
turns an open question (no option A) into A = the answer, B = "Other Answers" with ground truth A.
Prompts are VLMEvalKit's MiniCPM-V wrapper's direct (non-CoT) ones; images come before the text.
"""

from __future__ import annotations

import re
from collections import defaultdict
from vlmcook.eval.tasks.common import OPTION_LETTERS, Item, TsvTask, group_means

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")
LETTER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
NO_OPTIONS = "Carefully read the following question Answer the question directly."  # sic, as released
CIRCULAR_STRIDE = 1_000_000  # copy k of question i has index i + k * 1e6


def infer_option(answer: str, choices: dict) -> str | None:
    """Step 1: the option letter written as a token near the end of the answer (or "Z")."""
    if any(r in answer for r in REFUSALS):
        return "Z"
    tokens = _SEPARATORS.sub(" ", answer).split()
    found = [c for c in choices if c in tokens]
    if len(found) == 1:
        return found[0] if tokens.index(found[0]) > len(tokens) - 5 else None
    if not found and "Z" in tokens:
        return "Z"
    return None


def infer_text(answer: str, choices: dict) -> str | None:
    """Step 2: the single option whose text the (short enough) answer contains."""
    low = answer.lower()
    if len(low) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def extract_choice(answer: str, choices: dict) -> str:
    return infer_option(answer, choices) or infer_text(answer, choices) or "Z"


class McqTask(TsvTask):
    """One question per TSV row; accuracy overall and per split / category / l2-category (VLMEvalKit report_acc)."""

    name = "mcq"
    max_new_tokens = 32
    group_keys = ("split", "category", "l2-category")
    metric = "accuracy (%)"

    def check(self, it: Item) -> None:
        it.meta.update({k: it.row[k] for k in ("answer", *self.group_keys) if it.row.get(k) is not None})
        if it.error is None and not self.choices(it.row):
            it.error = f"line {it.meta['line']}: no option columns (A, B, ...) filled"

    def choices(self, row: dict) -> dict:
        return {c: row[c] for c in OPTION_LETTERS if row.get(c) is not None}

    def truth(self, row: dict) -> str:
        return str(row["answer"]).strip()

    def prompt(self, row: dict) -> list[str]:
        """Text items after the images (VLMEvalKit's MiniCPM-V wrapper, direct answers)."""
        text = f"Hint: {row['hint']}\n" if row.get("hint") is not None else ""
        text += f"Question: {row['question']}\n"
        options = self.choices(row)
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + LETTER_SUFFIX
        return [text]

    def messages(self, item: Item) -> list[dict]:
        return [{"role": "user", "content": [*self.images(item), *self.prompt(item.row)]}]

    def score(self, item: Item, answer: str) -> dict:
        got = extract_choice(answer, self.choices(item.row))
        return {"extracted": got, "score": float(got == self.truth(item.row))}

    def aggregate(self, records: list[dict]) -> dict:
        return {"metric": self.metric, **group_means(records, self.group_keys)}


class MmbenchTask(McqTask):
    """MMBench: circular evaluation over the copies the TSV holds; the denominator is the number of questions."""

    name = "mmbench"

    def check(self, it: Item) -> None:
        super().check(it)
        try:
            it.meta["g_index"] = int(it.row["index"]) % CIRCULAR_STRIDE
        except (TypeError, ValueError):
            it.meta["g_index"] = it.id
            it.error = it.error or f"line {it.meta['line']}: index {it.row.get('index')!r} is not an integer"

    def limit(self, items: list[Item], n: int) -> list[Item]:
        """The first n questions, each with all its circular copies."""
        keep = list(dict.fromkeys(it.meta["g_index"] for it in items))[:n]
        wanted = set(keep)
        return [it for it in items if it.meta["g_index"] in wanted]

    def aggregate(self, records: list[dict]) -> dict:
        groups = defaultdict(list)
        for r in records:
            groups[r["g_index"]].append(r)
        questions = []
        for g, rows in groups.items():
            main = next((r for r in rows if str(r["id"]) == str(g)), rows[0])  # the unshifted copy
            errors = [r["error"] for r in rows if r.get("error") is not None]
            hit = not errors and all(r.get("score") == 1.0 for r in rows)
            questions.append({**{k: main.get(k) for k in self.group_keys}, "score": float(hit),
                              "error": errors[0] if errors else None})
        out = {"metric": "circular accuracy (%): a question counts only if all its copies are right",
               **group_means(questions, self.group_keys)}
        out["rows"] = len(records)
        out["row_errors"] = sum(r.get("error") is not None for r in records)
        return out


class MmmuTask(McqTask):
    """MMMU (DEV_VAL TSV): multiple choice, plus VLMEvalKit's reformulation of the open questions."""

    name = "mmmu"

    def check(self, it: Item) -> None:
        super().check(it)  # open questions get their two options in `choices`, so they are no error
        it.meta["open"] = it.row.get("A") is None

    def choices(self, row: dict) -> dict:
        if row.get("A") is None:  # MMMU_preproc: an open question becomes a two-way choice
            return {"A": row.get("answer"), "B": "Other Answers"}
        return super().choices(row)

    def truth(self, row: dict) -> str:
        t = str(row["answer"]).strip()
        return t if len(t) == 1 and t in OPTION_LETTERS else "A"

    def prompt(self, row: dict) -> list[str]:
        if row.get("A") is not None:
            return super().prompt(row)
        # no options: the wrapper's system prompt moves into the text for MMMU
        return [f"{NO_OPTIONS}\nQuestion: {row['question']}\n"]

