"""Training data: SFT records -> processed samples, skip accounting, a seeded mixture, batches and sequence packing.

SFT JSONL, one object per line (every rule: docs/architecture.md, "SFT JSONL"); paths are relative to the file:
    {"id": "doc-17", "images": ["img/doc-17.png"], "videos": [{"path": "vid/v3.mp4", "fps": 5, "packing": 2}],
     "messages": [{"role": "user", "content": "(<image>./</image>)\\n(<video>./</video>)\\nWhat ...?"},
                  {"role": "assistant", "content": "..."}], "meta": {...}}
Markers take the next "images" / "videos" entry in order (the counts must match); the last message is an
assistant turn (every assistant turn is supervised, chat.build_labels).

Bad input (unparsable line, wrong shape, media that fails to decode, sample longer than `max_length`, by default the
model's context) is skipped and counted once per record in a `SkipLog` (reason, file:line), or with `strict=True`
raises `DataError` naming file:line. Limits and every class of bad line: docs/reliability.md ("SFT and RL JSONL").
`collate_batch` pads on the right (labels -100 on pads); `pack` puts several samples in one row, `segment_ids [B, T]`
making attention block-diagonal causal. `Mixture`: sample i is a pure function of (seed, i), so a resumed run
continues at i and rank r of `world` processes takes positions r, r + world, ... (`Mixture.iterate`).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch

from vlmcook.data.chat import IGNORE_INDEX
from vlmcook.data.image import IMAGE_MARKER, ImageError
from vlmcook.data.processor import VIDEO_MARKER, ContextLengthError, Processor, collate
from vlmcook.data.video import VideoError


class DataError(ValueError):
    """A training record that cannot be used; the message starts with file:line (or the source name and index)."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {reason}: {message}")
        self.where, self.reason = where, reason


@dataclass
class SkipLog:
    """Skipped records, each counted once however often a mixture draws it: counts per reason, (up to `keep`) the
    entries (reason, where, message), and `redrawn`, how many more times skipped records were drawn."""

    counts: Counter = field(default_factory=Counter)
    entries: list[tuple[str, str, str]] = field(default_factory=list)
    keep: int = 1000
    redrawn: int = 0

    def add(self, err: DataError) -> None:
        self.counts[err.reason] += 1
        if len(self.entries) < self.keep:
            self.entries.append((err.reason, err.where, str(err)))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no records skipped"
        head = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items()))
        again = f"; drawn again {self.redrawn} times" if self.redrawn else ""
        return f"skipped {self.total} records ({head}{again}); first: " + "; ".join(e[2] for e in self.entries[:3])


# ---- records -> processor messages -----------------------------------------------------------------------------
def _resolve(entry: Any, root: Path | None) -> Any:
    """A relative path is relative to the JSONL's folder; PIL images / bytes pass through."""
    if isinstance(entry, str) and root is not None and not Path(entry).is_absolute():
        return str(root / entry)
    return entry


def _video_item(entry: Any, root: Path | None, where: str) -> dict:
    """{'path', knobs...} -> the processor's video item (which checks the knobs and rejects unknown keys)."""
    if not isinstance(entry, dict) or "path" not in entry:
        raise DataError(where, "bad_record", f"a video entry must be an object with 'path' (and optionally fps, "
                                             f"packing, max_frames, max_visual_tokens, ...), got {entry!r:.120}")
    return {"type": "video", "video": _resolve(entry["path"], root), **{k: v for k, v in entry.items() if k != "path"}}


def _split_videos(text: str, videos: list, root: Path | None, where: str) -> str | list:
    """Replace each video marker by a video content item; one newline on each side is absorbed by the join."""
    if VIDEO_MARKER not in text:
        return text
    parts, items = text.split(VIDEO_MARKER), []
    for k, part in enumerate(parts):
        if k > 0:
            part = part[1:] if part.startswith("\n") else part
        if k < len(parts) - 1:
            part = part[:-1] if part.endswith("\n") else part
        if part:
            items.append(part)
        if k < len(parts) - 1:
            if not videos:
                raise DataError(where, "bad_record", f"more {VIDEO_MARKER} markers than entries in 'videos'")
            items.append(_video_item(videos.pop(0), root, where))
    return items


RECORD_KEYS = ("id", "images", "videos", "messages", "meta")  # of an SFT record; anything else goes in "meta"
MESSAGE_KEYS = ("role", "content", "reasoning_content")


def record_to_messages(record: Any, root: Path | None = None, where: str = "record",
                       keys: Sequence[str] | None = None) -> tuple[list[dict], list]:
    """An SFT record -> (messages, images) for `Processor.__call__`. Raises DataError(reason='bad_record').
    `keys`: the record's allowed keys, others refused (a misspelt "image" would otherwise drop the image without a
    word); None: not checked (formats that add their own keys)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise DataError(where, "bad_record", "a record must be an object with a non-empty 'messages' list")
    unknown = sorted(set(record) - set(keys)) if keys is not None else []
    if unknown:
        raise DataError(where, "bad_record", f"unknown key(s) {unknown} (a record has {', '.join(keys)})")
    images, videos = record.get("images") or [], list(record.get("videos") or [])
    if not isinstance(images, list) or not isinstance(record.get("videos") or [], list):
        raise DataError(where, "bad_record", "'images' and 'videos' must be lists")
    n_markers = 0
    messages = []
    for k, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str) or set(m) - set(MESSAGE_KEYS) \
                or not isinstance(m.get("reasoning_content", ""), str):
            raise DataError(where, "bad_record", f"message {k} must be {{'role': system|user|assistant, "
                                                 f"'content': str}} (and optionally 'reasoning_content': str), got "
                                                 f"{m!r:.120}")
        n_markers += m["content"].count(IMAGE_MARKER)
        messages.append({**m, "content": _split_videos(m["content"], videos, root, where)})
    if n_markers != len(images) or videos:
        raise DataError(where, "bad_record", f"{n_markers} image markers for {len(images)} images, "
                                             f"{len(videos)} videos without a marker")
    if messages[-1]["role"] != "assistant":
        raise DataError(where, "bad_record", "the last message must be an assistant turn (the training target)")
    return messages, [_resolve(im, root) for im in images]


# ---- sources ---------------------------------------------------------------------------------------------------
class Records(Protocol):
    """Anything with a length and `record(i) -> (record dict, where)`."""

    def __len__(self) -> int: ...

    def record(self, i: int) -> tuple[Any, str]: ...


class RecordSource:
    """Map-style source of processed samples (Processor outputs, batch 1) over SFT records.

    `source[i]` -> the sample dict, or None when the record was skipped (counted once in `self.skips`, and not
    processed again when drawn again); strict -> raises. `root`: folder that relative paths are resolved against (a
    JSONL's folder). `max_length`: longer samples are skipped (`too_long`); default the model's context."""

    def __init__(self, records: Records, tokenizer, config, root: str | Path | None = None, strict: bool = False,
                 max_length: int | None = None, thinking: bool | None = False):
        self.records, self.strict, self.thinking = records, strict, thinking
        self.root = Path(root) if root is not None else None
        self.processor = Processor(tokenizer, config)
        self.max_length = config.llm.max_position_embeddings if max_length is None else max_length
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        self.skips = SkipLog()
        self._bad: dict[int, DataError] = {}  # skipped records by index

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | None:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} outside [0, {len(self)})")
        if i in self._bad:
            if self.strict:
                raise self._bad[i]
            self.skips.redrawn += 1
            return None
        try:
            return self._sample(i)
        except DataError as e:
            self._bad[i] = e
            if self.strict:
                raise
            self.skips.add(e)
            if torch.utils.data.get_worker_info() is not None:  # this SkipLog is a worker's copy: say it here
                print(f"skipped (data worker): {e}", file=sys.stderr, flush=True)
            return None

    def _sample(self, i: int) -> dict:
        record, where = self.records.record(i)
        messages, images = record_to_messages(record, self.root, where, RECORD_KEYS)
        try:
            out = self.processor(messages, images, thinking=self.thinking, add_generation_prompt=False,
                                 max_length=self.max_length)  # checked from headers, before decoding
        except ContextLengthError as e:
            raise DataError(where, "too_long", f"{e.prompt_tokens} tokens > max_length={self.max_length}") from None
        except ImageError as e:
            raise DataError(where, "image", str(e)) from None
        except VideoError as e:
            raise DataError(where, "video", str(e)) from None
        except (ValueError, TypeError, OSError) as e:  # e.g. a missing file, a marker the chat template drops
            raise DataError(where, "bad_record", str(e)) from None
        out["id"] = record.get("id", where)
        return out


# One JSONL line at most: records name their media files and hold text, so a longer line is refused unread (a
# 100k-token document is ~0.5 MB of JSON). Bounds what reading one record can allocate.
MAX_LINE_BYTES = 16 * 2**20
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as Windows editors write at the start of a file


def _lines(path: Path, block: int = 2**20) -> Iterator[tuple[int, int, int]]:
    """(byte offset, byte length without the newline, 1-based line number) of each non-blank line, reading `block`
    bytes at a time (one huge line costs no memory here). A leading byte-order mark is not part of line 1."""
    with open(path, "rb") as f:
        start = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
        f.seek(start)
        pos, n, blank = start, 1, True
        while chunk := f.read(block):
            i = 0
            while (j := chunk.find(b"\n", i)) != -1:
                if not (blank and not chunk[i:j].strip()):
                    yield start, pos + j - start, n
                start, n, blank, i = pos + j + 1, n + 1, True, j + 1
            blank = blank and not chunk[i:].strip()
            pos += len(chunk)
        if not blank:
            yield start, pos - start, n


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse(raw: bytes, where: str) -> Any:
    """One JSONL line -> its value, or DataError(reason='bad_json') naming `where` (file:line)."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise DataError(where, "bad_json", f"not UTF-8 text ({e})") from None
    except ValueError as e:  # json.JSONDecodeError, NaN / Infinity
        raise DataError(where, "bad_json", str(e)) from None
    except RecursionError:
        raise DataError(where, "bad_json", "nested too deeply") from None


class JsonlRecords:
    """Lines of a JSONL file, indexed by byte offset at open (blank lines dropped), parsed on access; a record
    that cannot be read or parsed raises DataError naming file:line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such JSONL file")
        self.offsets: list[tuple[int, int, int]] = list(_lines(self.path))  # (byte offset, length, line number)

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, i: int) -> tuple[Any, str]:
        pos, size, n = self.offsets[i]
        where = f"{self.path}:{n}"
        if size > MAX_LINE_BYTES:  # refused unread
            raise DataError(where, "too_large", f"a line of {size:,} bytes, more than {MAX_LINE_BYTES:,} (records "
                                                f"name their images and videos, they do not hold them)")
        try:
            with open(self.path, "rb") as f:
                f.seek(pos)
                raw = f.read(size)
        except OSError as e:
            raise DataError(where, "unreadable", str(e)) from None
        return _parse(raw, where), where


class JsonlSource(RecordSource):
    """An SFT JSONL file as a map-style source; relative media paths are resolved against its folder."""

    def __init__(self, path: str | Path, tokenizer, config, strict: bool = False, max_length: int | None = None,
                 thinking: bool | None = False):
        records = JsonlRecords(path)
        super().__init__(records, tokenizer, config, records.path.parent, strict, max_length, thinking)


class ListRecords:
    """Records held in memory (a list, or any object with `__len__` and `__getitem__(i) -> record`)."""

    def __init__(self, items, name: str = "memory"):
        self.items, self.name = items, name

    def __len__(self) -> int:
        return len(self.items)

    def record(self, i: int) -> tuple[Any, str]:
        return self.items[i], f"{self.name}[{i}]"


# ---- mixture ---------------------------------------------------------------------------------------------------
class Mixture:
    """Weighted mixture of map-style sources; sample i depends on (seed, i) only.

    A source may return None (a skipped record): the draw is then repeated with a new attempt number, still a pure
    function of (seed, i, attempt), up to `max_attempts`."""

    def __init__(self, sources: Sequence[tuple[Any, float]], seed: int, max_attempts: int = 32):
        bad = [(_name(s), w) for s, w in sources if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)]
        if not sources or bad or sum(w for _, w in sources) <= 0:
            raise ValueError(f"Mixture: give (source, weight) pairs with finite weights >= 0 and a positive sum"
                             f"{f' (got weight {bad[0][1]!r} for {bad[0][0]})' if bad else ''}")
        empty = [s for s, w in sources if w > 0 and len(s) == 0]
        if empty:
            raise ValueError(f"Mixture: a source with a positive weight is empty ({_name(empty[0])})")
        self.sources = [s for s, _ in sources]
        self.weights = [float(w) for _, w in sources]
        self.seed, self.max_attempts = seed, max_attempts

    def draw(self, i: int, attempt: int = 0) -> tuple[int, int]:
        """Position i -> (source index, item index), pure in (seed, i, attempt)."""
        rng = random.Random(f"mixture:{self.seed}:{i}:{attempt}")  # str seeds hash with sha512: stable everywhere
        k = rng.choices(range(len(self.sources)), weights=self.weights)[0]  # a zero weight is never chosen
        return k, rng.randrange(len(self.sources[k]))

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            raise IndexError(f"Mixture: position {i} must be >= 0 (the stream has no end to count from)")
        for attempt in range(self.max_attempts):
            k, j = self.draw(i, attempt)
            sample = self.sources[k][j]
            if sample is not None:
                return sample
        skips = "; ".join(f"{_name(s)}: {s.skips.summary()}" for s in self.sources if getattr(s, "skips", None))
        raise DataError(f"mixture position {i}", "all_skipped", f"the mixture's {self.max_attempts} draws were all "
                                                                f"skipped records ({skips or 'see each source'})")

    def iterate(self, start: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, dict]]:
        """Yield (position, sample) for positions start + rank, start + rank + world_size, ... (forever).
        Resume with start = the next unconsumed global position (a multiple of world_size)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        i = start + rank
        while True:
            yield i, self[i]
            i += world_size


def _name(source) -> str:
    """A source for messages: a RecordSource over a JSONL file says which file."""
    return str(getattr(getattr(source, "records", None), "path", None) or type(source).__name__)


# ---- batches ---------------------------------------------------------------------------------------------------
def collate_batch(samples: Sequence[dict], pad_id: int) -> dict[str, Any]:
    """Samples (batch-1 processor outputs) -> a right-padded batch; labels are -100 on padding."""
    keep = ("input_ids", "attention_mask", "labels", "pixel_values", "temporal_ids", "image_bound")
    return collate([{k: s[k] for k in keep if k in s} for s in samples], pad_id, padding_side="right")


def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit, in order: sample indices per row, each row's total length <= max_tokens."""
    rows, room = [], []
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"pack: sample {i} has {n} tokens, more than max_tokens={max_tokens}")
        r = next((k for k, left in enumerate(room) if left >= n), None)
        if r is None:
            rows.append([])
            room.append(max_tokens)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows


def pack(samples: Sequence[dict], max_tokens: int, pad_id: int = 0) -> dict[str, Any]:
    """Pack samples into rows of <= max_tokens (padded to the longest row). Adds `segment_ids [B, T]` and
    `position_ids [B, T]` (restarting per sample); pass both to MiniCPMV.forward. `attention_mask` = segment > 0."""
    rows = pack_rows([s["input_ids"].shape[1] for s in samples], max_tokens)
    T = max(sum(samples[i]["input_ids"].shape[1] for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    out: dict[str, Any] = {"pixel_values": [], "temporal_ids": [], "image_bound": []}
    for b, row in enumerate(rows):
        t, views, packages, bounds = 0, [], [], []
        for k, i in enumerate(row, 1):
            s = samples[i]
            n = s["input_ids"].shape[1]
            ids[b, t:t + n] = s["input_ids"][0]
            if "labels" in s:
                labels[b, t:t + n] = s["labels"][0]
                labels[b, t] = IGNORE_INDEX  # never a target of the previous sample's last token
            seg[b, t:t + n] = k
            pos[b, t:t + n] = torch.arange(n)
            views += s["pixel_values"][0]
            packages += s["temporal_ids"][0]
            bounds.append(s["image_bound"][0].reshape(-1, 2) + t)
            t += n
        out["pixel_values"].append(views)
        out["temporal_ids"].append(packages)
        out["image_bound"].append(torch.cat(bounds))
    out.update(input_ids=ids, labels=labels, segment_ids=seg, position_ids=pos, attention_mask=(seg > 0).long(),
               rows=rows)
    return out


def token_batches(mixture: Mixture, batch_tokens: int, row_tokens: int, pad_id: int, max_samples: int = 256):
    """-> `position -> iterator of packed micro-batches` (train.loop's `batches`) of about `batch_tokens` tokens:
    micro-batch k takes mixture positions k * max_samples, k * max_samples + 1, ... until its samples hold
    `batch_tokens` tokens, packed into rows of `row_tokens` (or the longest sample). So batch k is a pure function
    of (mixture seed, k) and a resumed run continues exactly."""
    def source(position: int) -> Iterator[dict]:
        for k in itertools.count(position):
            picked, tokens = [], 0
            for j in range(max_samples):
                picked.append(mixture[k * max_samples + j])
                tokens += picked[-1]["input_ids"].shape[1]
                if tokens >= batch_tokens:
                    break
            yield pack(picked, max(row_tokens, max(s["input_ids"].shape[1] for s in picked)), pad_id)
    return source


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, batches, position: int):
        self.batches, self.position = batches, position

    def __iter__(self) -> Iterator[dict]:
        return self.batches(self.position)


def in_background(batches, workers: int = 1):
    """`batches` (position -> iterator of micro-batches) produced by a DataLoader worker process, so decoding and
    processing media overlap the training step on another core. One worker keeps the order (and so the run)
    exactly the same as in-process; `workers=0` runs in-process. Sources' `skips` then count in the worker's copy,
    which the caller never sees: each skipped record is printed on stderr there instead."""
    def source(position: int) -> Iterator[dict]:
        if workers == 0:
            return batches(position)
        return iter(torch.utils.data.DataLoader(_Stream(batches, position), batch_size=None, num_workers=workers,
                                                prefetch_factor=4, persistent_workers=False))
    return source
