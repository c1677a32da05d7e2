"""OCR evaluation on held-out document samples: character error rate per corruption level.

Notable:
- A sample's level is the most severe level among its corrupted regions (`meta.regions[*].level`), "clean" when
  none is. The demo's pages hold one text region, so the level is exactly that region's.
- "high" regions are fully masked (corrupt.py): no pixel of their text survives, so their CER measures what the
  model guesses from context and its language prior alone - a built-in blind baseline for the other levels.
- References are the samples' own assistant targets (the original, uncorrupted text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmcook.data.processor import Processor
from vlmcook.eval.generate import greedy, prompt_of
from vlmcook.eval.metrics import cer
from vlmcook.train.data import JsonlRecords, record_to_messages

SEVERITY = ("clean", "low", "medium", "high")


@dataclass
class OcrItem:
    id: str
    prompt: dict  # processor output ending in the generation prompt
    reference: str
    level: str


def sample_level(meta: dict) -> str:
    levels = [r.get("level") for r in meta.get("regions", []) if r.get("level")]
    return max(levels, key=SEVERITY.index) if levels else "clean"


def ocr_items(jsonl: str | Path, tokenizer, config, limit: int | None = None) -> list[OcrItem]:
    """Held-out document samples (vlmcook/data/docs JSONL) -> prompts + references + levels."""
    records = JsonlRecords(jsonl)
    proc = Processor(tokenizer, config)
    items = []
    for i in range(min(len(records), limit or len(records))):
        rec, where = records.record(i)
        messages, images = record_to_messages(rec, records.path.parent, where)
        items.append(OcrItem(rec.get("id", where), prompt_of(proc, messages, images), messages[-1]["content"],
                             sample_level(rec.get("meta", {}))))
    return items


def eval_ocr(model, tokenizer, items: list[OcrItem], max_new_tokens: int, examples: int = 4) -> dict:
    """-> {"cer": corpus CER, "per_level": {level: CER}, "per_level_other_page": {level: CER against another
    page's reference}, "n_per_level": {...}, "examples": [...], "outputs": [...]}."""
    if not items:
        raise ValueError("eval_ocr: no held-out document samples")
    hyps = greedy(model, tokenizer, [it.prompt for it in items], max_new_tokens)
    refs = [it.reference for it in items]
    per_level, other, counts = {}, {}, {}
    for level in SEVERITY:
        idx = [k for k, it in enumerate(items) if it.level == level]
        if idx:
            per_level[level] = cer([hyps[k] for k in idx], [refs[k] for k in idx])
            # the same outputs against another page's text (the next of the level): what an output that ignores
            # its page scores; reading shows as the gap between the two
            other[level] = cer([hyps[k] for k in idx], [refs[k] for k in idx[1:] + idx[:1]])
            counts[level] = len(idx)
    shown = [{"level": items[k].level, "reference": refs[k], "output": hyps[k]} for k in range(min(examples,
                                                                                                  len(items)))]
    return {"cer": cer(hyps, refs), "per_level": per_level, "per_level_other_page": other, "n_per_level": counts,
            "examples": shown, "outputs": hyps}
