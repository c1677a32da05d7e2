"""What every benchmark task shares: `Item` (one question), the VLMEvalKit TSV reader, images of a TSV row, and
per-group means over scored records.

Notable (docs/eval.md has the narrative):
- The TSV is read as VLMEvalKit reads it (pandas `read_csv(sep="\\t")` with its defaults): quoted fields may span
  lines, and a cell pandas turns into NaN (empty, "NA", "None", "nan", "null", ...) counts as missing here too, so
  an option cell holding exactly "None" is dropped from the prompt as VLMEvalKit drops it.
- Images: the `image` column holds base64 (or a list literal of them for multi-image rows); a value of at most 64
  characters is the `index` of the row whose image it shares (MMBench's circular copies do this); without an
  `image` column, `image_path` holds a path (or a list literal of paths) relative to the media folder.
- A row that cannot become a prompt is kept as an Item with `error` set: it is recorded in predictions.jsonl,
  counted in scores.json `errors` and scores 0 in the denominator (never dropped).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# pandas.read_csv's default NaN strings (pandas/_libs/parsers.pyx STR_NA_VALUES)
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VQA_HINT = "Answer the question using a single word or phrase."  # VLMEvalKit's MiniCPM-V wrapper (vqa_prompt)


class SampleError(ValueError):
    """A row that cannot be turned into a prompt (missing column, bad base64, missing file)."""


@dataclass
class Item:
    id: str
    row: dict = field(repr=False)  # the raw row / record (never written out: it may hold base64 images)
    meta: dict = field(default_factory=dict)  # written to predictions.jsonl: reference, category, split, ...
    error: str | None = None  # set when the row cannot be asked at all


# ---- the VLMEvalKit TSV layout ---------------------------------------------------------------------------------
def read_tsv(path: Path, required: Iterable[str]) -> list[Item]:
    """A VLMEvalKit TSV -> Items keyed by `index` (ids made unique); rows missing a required column get an error."""
    if not path.is_file():
        raise ValueError(f"--data {path}: this task reads one VLMEvalKit .tsv file")
    csv.field_size_limit(2**31 - 1)  # base64 images are far over csv's 128 KB default field limit
    items: list[Item] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        if "index" not in header:
            raise ValueError(f"{path}: no 'index' column in the header {header[:12]} (is this a VLMEvalKit TSV?)")
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            row = {k: (None if v is None or v in PANDAS_NA else v) for k, v in row.items() if k is not None}
            item = Item(str(row.get("index") or where), row, {"line": reader.line_num})
            missing = [c for c in required if row.get(c) is None]
            if missing:
                item.error = f"{where}: missing value in column(s) {missing}"
            items.append(item)
    return unique_ids(items)


def unique_ids(items: list[Item]) -> list[Item]:
    """Ids key the resumable predictions.jsonl: a repeated id gets '#2', '#3', ... (and a note in meta)."""
    seen: Counter = Counter()
    for it in items:
        seen[it.id] += 1
        if seen[it.id] > 1:
            it.meta["duplicate_of"] = it.id
            it.id = f"{it.id}#{seen[it.id]}"
    return items


def literal_list(value: Any) -> list | None:
    """'["a", "b"]' -> ['a', 'b'] (VLMEvalKit stores lists as Python literals in TSV cells); else None."""
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None
        return parsed if isinstance(parsed, list) else None
    return None


def answer_list(row: dict) -> list:
    """The `answer` cell as a list: a list literal (several acceptable answers) or one answer."""
    value = row.get("answer")
    return literal_list(value) or ([value] if value is not None else [])


def row_images(item: Item, by_index: dict[str, Item], media_dir: Path) -> list[dict]:
    """Image content items of a TSV row (base64 -> bytes, a short value -> that row's image, else image_path)."""
    row = item.row
    if row.get("image") is not None:
        value = row["image"]
        if len(value) <= 64:  # VLMEvalKit: the index of the row whose image this row shares
            if value not in by_index or by_index[value].row.get("image") is None:
                raise SampleError(f"image refers to row index {value!r}, which has no image")
            value = by_index[value].row["image"]
        sources = literal_list(value) or [value]
        try:  # lenient like VLMEvalKit's b64decode; bytes that are no image fail when the backend decodes them
            return [{"type": "image", "image": base64.b64decode(s)} for s in sources]
        except (binascii.Error, ValueError) as e:
            raise SampleError(f"image: not valid base64 ({e})") from None
    if row.get("image_path") is not None:
        paths = literal_list(row["image_path"]) or [row["image_path"]]
        out = []
        for p in paths:
            full = Path(p) if Path(p).is_absolute() else media_dir / p
            if not full.is_file():
                raise SampleError(f"image_path {p}: no such file under {media_dir}")
            out.append({"type": "image", "image": str(full)})
        return out
    raise SampleError("no 'image' (base64) nor 'image_path' value")


class TsvTask:
    """Base of the TSV tasks: load rows, let `check` fill each item's meta (and error), images by VLMEvalKit's rule."""

    required: tuple[str, ...] = ("question", "answer")

    def load(self, path: Path, media_dir: Path | None) -> list[Item]:
        self.media_dir = media_dir or path.parent
        items = read_tsv(path, self.required)
        self.by_index = {it.row["index"]: it for it in items if it.row.get("index") is not None}
        for it in items:
            self.check(it)
        return items

    def check(self, item: Item) -> None:
        pass

    def limit(self, items: list[Item], n: int) -> list[Item]:
        return items[:n]

    def images(self, item: Item) -> list[dict]:
        return row_images(item, self.by_index, self.media_dir)


# ---- aggregation ------------------------------------------------------------------------------------------------
def group_means(records: list[dict], keys: Iterable[str], scale: float = 100.0) -> dict:
    """Mean score over all records (an errored record scores 0 and stays in the denominator) and per value of
    each key present in the records' meta: {"overall", "n", "errors", "by": {key: {value: {"score", "n"}}}}."""
    if not records:
        return {"overall": None, "n": 0, "errors": 0, "by": {}}
    out = {"overall": scale * sum(float(r.get("score") or 0.0) for r in records) / len(records),
           "n": len(records), "errors": sum(r.get("error") is not None for r in records), "by": {}}
    for key in keys:
        groups = defaultdict(list)
        for r in records:
            if r.get(key) is not None:
                groups[str(r[key])].append(float(r.get("score") or 0.0))
        if groups:
            out["by"][key] = {v: {"score": scale * sum(s) / len(s), "n": len(s)} for v, s in sorted(groups.items())}
    return out
