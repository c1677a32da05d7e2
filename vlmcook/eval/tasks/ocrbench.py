"""OCRBench (VLMEvalKit's OCRBench.tsv: index, image, question, answer = a list literal, category): its official
answer-list matching and its five category groups, summed out of 1000 on the full set.

Matching (OCRBench / VLMEvalKit `OCRBench.evaluate`): a row scores 1 if any reference answer occurs as a substring
of the prediction after normalisation. Normalisation: for "Handwritten Mathematical Expression Recognition", strip,
newlines -> spaces, then every space removed (case kept: LaTeX is case-sensitive); for every other category,
lower-case, strip, newlines -> spaces. The ten categories sum into five groups (Text Recognition = the six
recognition categories). A row of another category is an error (counted, scores 0), never a KeyError.
Prompt: VLMEvalKit's MiniCPM-V wrapper (its short-answer hint, the image, the question).
"""

from __future__ import annotations

from vlmcook.eval.tasks.common import VQA_HINT, Item, TsvTask, answer_list

HME = "Handwritten Mathematical Expression Recognition"
GROUPS = {  # category -> its group in the final table
    "Regular Text Recognition": "Text Recognition", "Irregular Text Recognition": "Text Recognition",
    "Artistic Text Recognition": "Text Recognition", "Handwriting Recognition": "Text Recognition",
    "Digit String Recognition": "Text Recognition", "Non-Semantic Text Recognition": "Text Recognition",
    "Scene Text-centric VQA": "Scene Text-centric VQA", "Doc-oriented VQA": "Doc-oriented VQA",
    "Key Information Extraction": "Key Information Extraction", HME: HME,
}


def ocrbench_hit(prediction: str, answers: list[str], category: str) -> bool:
    if category == HME:
        def norm(s: str) -> str:
            return s.strip().replace("\n", " ").replace(" ", "")
    else:
        def norm(s: str) -> str:
            return s.lower().strip().replace("\n", " ")
    pred = norm(prediction)
    return any(norm(str(a)) in pred for a in answers)


class OcrBenchTask(TsvTask):
    name = "ocrbench"
    max_new_tokens = 128
    metric = "OCRBench score (correct answers; 1000 on the full set)"
    required = ("question", "answer", "category")

    def check(self, it: Item) -> None:
        it.meta.update(answers=answer_list(it.row), category=it.row.get("category"))
        if it.error is None and it.meta["category"] not in GROUPS:
            it.error = f"line {it.meta['line']}: category {it.meta['category']!r} is none of OCRBench's ten"
        it.meta["group"] = GROUPS.get(it.meta["category"])

    def messages(self, item: Item) -> list[dict]:
        return [{"role": "user", "content": [VQA_HINT, *self.images(item), item.row["question"]]}]

    def score(self, item: Item, answer: str) -> dict:
        hit = ocrbench_hit(answer, item.meta["answers"], item.meta["category"])
        return {"extracted": answer, "score": float(hit)}

    def aggregate(self, records: list[dict]) -> dict:
        by = {g: {"score": 0, "n": 0} for g in dict.fromkeys(GROUPS.values())}  # score = correct answers
        for r in records:
            if r.get("group") in by:
                by[r["group"]]["n"] += 1
                by[r["group"]]["score"] += int(r.get("score") or 0)
        total = sum(g["score"] for g in by.values())
        return {"metric": self.metric, "overall": total, "n": len(records),
                "errors": sum(r.get("error") is not None for r in records), "by": {"group": by},
                "percent": 100 * total / len(records) if records else None}
