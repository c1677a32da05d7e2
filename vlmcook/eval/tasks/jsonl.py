"""Your own data: the project's SFT JSONL records plus a verifier (the demo's held-out sets run through it too).

Record: the SFT format (vlmcook/train/data.py: id, images, videos, messages with markers) where either the last
message is the assistant's reference answer, or the messages end with the user turn and "answer" holds the
reference (a string or a list of acceptable answers, as in `vlmcook rl` prompt files; "answer" wins when both).
Optional keys: "verifier" (number | choice | string | anls | cer; default `--verifier`, else string),
"tolerance" (absolute, for number), "category" (default: the demo pages' corruption level from meta.regions, else
meta.task). Image markers become image items in place (one newline on each side absorbed, as the SFT reader does
for video markers), so both backends get the same content list.
Verifiers: number / choice / string are vlmcook.rl.rewards' rule verifiers; anls is the VQA task's (the RRC
script's rule, docs/eval.md); cer is eval.metrics' character error rate aggregated over the corpus (edits /
reference characters, lower is better; a failed sample counts as an empty answer).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from vlmcook.data.image import IMAGE_MARKER
from vlmcook.eval.metrics import cer
from vlmcook.eval.ocr import sample_level
from vlmcook.eval.tasks.common import Item, SampleError, group_means, unique_ids
from vlmcook.eval.tasks.vqa import anls
from vlmcook.rl.rewards import choice_letter, last_number, verify_choice, verify_number, verify_string
from vlmcook.train.data import DataError, record_to_messages

VERIFIER_NAMES = ("number", "choice", "string", "anls", "cer")


def inline_images(messages: list[dict], images: list) -> list[dict]:
    """`(<image>./</image>)` markers in string contents -> image items, in order."""
    images, out = list(images), []
    for m in messages:
        items = []
        for part in m["content"] if isinstance(m["content"], list) else [m["content"]]:
            chunks = part.split(IMAGE_MARKER) if isinstance(part, str) else [part]
            for k, chunk in enumerate(chunks):
                if isinstance(chunk, str):
                    chunk = chunk[1:] if k > 0 and chunk.startswith("\n") else chunk
                    chunk = chunk[:-1] if k < len(chunks) - 1 and chunk.endswith("\n") else chunk
                if chunk != "":
                    items.append(chunk)
                if k < len(chunks) - 1:
                    items.append({"type": "image", "image": images.pop(0)})
        out.append({**m, "content": items[0] if len(items) == 1 and isinstance(items[0], str) else items})
    return out


def _category(rec: dict) -> str | None:
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    if rec.get("category") is not None:
        return str(rec["category"])
    return sample_level(meta) if meta.get("regions") else meta.get("task")


def _reference(rec: dict):
    """(reference, prompt messages) of a record; raises ValueError naming what is missing."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
        raise ValueError("a record needs a non-empty 'messages' list")
    ends_with_answer = msgs[-1].get("role") == "assistant"
    prompt = msgs[:-1] if ends_with_answer else msgs
    ref = rec.get("answer", msgs[-1].get("content") if ends_with_answer else None)
    if ref is None or ref == "" or ref == []:
        raise ValueError("no reference: end 'messages' with the assistant's answer or give 'answer'")
    return ref, prompt


def _check(verifier: str, ref) -> None:
    first = ref if isinstance(ref, str) else str(ref[0])
    if verifier == "number" and last_number(first) is None:
        raise ValueError(f"reference {first!r} holds no number (verifier number)")
    if verifier == "choice" and choice_letter(first) is None:
        raise ValueError(f"reference {first!r} is not an option letter (verifier choice)")
    if verifier == "cer" and not first.split():
        raise ValueError("an empty reference has no character error rate (verifier cer)")


class JsonlTask:
    name = "jsonl"
    max_new_tokens = 256

    def __init__(self, verifier: str | None = None):
        if verifier is not None and verifier not in VERIFIER_NAMES:
            raise ValueError(f"--verifier {verifier!r} is not one of {VERIFIER_NAMES}")
        self.default_verifier = verifier or "string"

    def load(self, path: Path, media_dir: Path | None) -> list[Item]:
        if path.is_dir() or not path.is_file():
            raise ValueError(f"--data {path}: the jsonl task reads one .jsonl file")
        self.root = media_dir or path.parent
        items = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                items.append(self._item(line, f"{path.name}:{n}"))
        return unique_ids(items)

    def _item(self, line: str, where: str) -> Item:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            return Item(where, {}, {}, f"{where}: not valid JSON ({e})")
        if not isinstance(rec, dict):
            return Item(where, {}, {}, f"{where}: a record must be a JSON object")
        verifier = rec.get("verifier") or self.default_verifier
        item = Item(str(rec.get("id", where)), rec, {"where": where, "verifier": verifier, "category": _category(rec)})
        try:
            if verifier not in VERIFIER_NAMES:
                raise ValueError(f"verifier {verifier!r} is not one of {VERIFIER_NAMES}")
            ref, _ = _reference(rec)
            _check(verifier, ref)
            item.meta["answer"] = ref
            if verifier == "cer":
                item.meta["chars"] = len(" ".join(str(ref).split()))
        except ValueError as e:
            item.error = f"{where}: {e}"
        return item

    def limit(self, items: list[Item], n: int) -> list[Item]:
        return items[:n]

    def messages(self, item: Item) -> list[dict]:
        rec = item.row
        _, prompt = _reference(rec)
        try:  # the SFT parser validates markers / media and wants a final assistant turn
            msgs, images = record_to_messages({**rec, "messages": [*prompt, {"role": "assistant", "content": ""}]},
                                              self.root, item.meta["where"])
        except DataError as e:
            raise SampleError(str(e)) from None
        return inline_images(msgs[:-1], images)

    def score(self, item: Item, answer: str) -> dict:
        v, ref = item.meta["verifier"], item.meta["answer"]
        refs = [ref] if isinstance(ref, str) else [str(r) for r in ref]
        if v == "cer":
            return {"extracted": answer, "score": cer(answer, refs[0])}
        if v == "number":
            tol = float(item.row.get("tolerance") or 0.0)
            s = max(verify_number(answer, r, abs_tol=tol) for r in refs)
        elif v == "choice":
            s = verify_choice(answer, refs[0])
        elif v == "anls":
            s = anls(answer, refs)
        else:
            s = verify_string(answer, refs)
        return {"extracted": answer, "score": float(s)}

    def aggregate(self, records: list[dict]) -> dict:
        per = defaultdict(list)
        for r in records:
            per[r.get("verifier") or "none"].append(r)
        summaries = {v: _corpus_cer(rs) if v == "cer" else {"metric": f"{v} (%)", **group_means(rs, ("category",))}
                     for v, rs in per.items()}
        if len(summaries) == 1:
            return next(iter(summaries.values()))
        return {"metric": "per verifier", "overall": None, "n": len(records),
                "errors": sum(r.get("error") is not None for r in records), "by_verifier": summaries}


def _corpus_cer(records: list[dict]) -> dict:
    """Sum of edits / sum of reference characters, overall and per category (an error = an empty answer)."""
    def corpus(rs):
        chars = sum(r.get("chars") or 0 for r in rs)
        edits = sum((r["chars"] if r.get("error") is not None else r["score"] * r["chars"]) for r in rs
                    if r.get("chars"))
        return edits / chars if chars else None
    by = defaultdict(list)
    for r in records:
        if r.get("category") is not None:
            by[r["category"]].append(r)
    return {"metric": "CER (corpus: edits / reference characters; lower is better)", "overall": corpus(records),
            "n": len(records), "errors": sum(r.get("error") is not None for r in records),
            "by": {"category": {k: {"score": corpus(v), "n": len(v)} for k, v in sorted(by.items())}} if by else {}}
