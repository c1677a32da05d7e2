"""Video-MME from its published question file plus a folder of videos: accuracy overall, by duration (short /
medium / long), domain and task type.

Question file: the HF parquet (`videomme/test-*.parquet`: videoID, video_id, question_id, duration, domain,
sub_category, task_type, question, options ["A. ...", ...], answer), the same rows as JSON / JSONL, or the official
nested JSON (the repo's output template: video_id, duration_category, video_category, video_subcategory,
questions [{question_id, task_type, question, choices|options, answer}]). Videos: `<videoID>.mp4` (also .MP4,
.mkv, .webm, .avi; then `<video_id>.*`) in the media folder (default: `data/` or `videos/` beside the file).
Extraction (the official eval_your_results.py `extract_characters_regex`): strip; delete the answer prefixes
(the script's list lacks two commas, so "The best option isThe correct option is" and "Best answer:Best option:"
are single prefixes - kept); more than 10 words and no A-D capital -> no answer; else the first capital A-D
anywhere (so "Answer: D" extracts "A", as the official script does).
Denominator: every question (an error or no extracted letter is wrong), as lmms-eval does. The official script
divides by the questions with an extracted letter only: that number is reported too (`answered_*`).
Prompt: the official one for frames without subtitles (README), video first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vlmcook.eval.tasks.common import Item, SampleError, group_means, unique_ids

PROMPT = ("Select the best answer to the following multiple-choice question based on the video. Respond with only "
          "the letter (A, B, C, or D) of the correct option.\n{question}\n{options}\nThe best answer is:")
PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
            "The best option isThe correct option is", "Best answer:Best option:")  # sic, see module docstring
VIDEO_EXTS = (".mp4", ".MP4", ".mkv", ".webm", ".avi")
NESTED = {"duration_category": "duration", "video_category": "domain", "video_subcategory": "sub_category"}


def extract_letter(response: str) -> str:
    s = response.strip()
    for p in PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search("[ABCD]", s)
    return m[0] if m else ""


def read_questions(path: Path) -> list[dict]:
    """Flat question rows from a parquet, JSON (flat or the official nested layout) or JSONL file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow: pip install 'vlmcook[eval]'") from None
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions (or of videos with 'questions')")
    rows = []
    for v in data:
        if isinstance(v, dict) and isinstance(v.get("questions"), list):  # the official nested layout
            video = {NESTED.get(k, k): x for k, x in v.items() if k != "questions"}
            rows += [{**video, **q} for q in v["questions"] if isinstance(q, dict)]
        else:
            rows.append(v if isinstance(v, dict) else {"_bad": v})
    return rows


def find_question_file(folder: Path) -> Path:
    found = sorted(p for ext in ("parquet", "json", "jsonl") for p in folder.rglob(f"*.{ext}"))
    if len(found) != 1:
        raise ValueError(f"{folder}: expected one question file (.parquet / .json / .jsonl) in it, found "
                         f"{[str(p) for p in found[:5]] or 'none'}; pass the file itself as --data")
    return found[0]


class VideoMmeTask:
    name = "videomme"
    max_new_tokens = 16
    group_keys = ("duration", "domain", "task_type")
    metric = "accuracy (%)"

    def load(self, path: Path, media_dir: Path | None) -> list[Item]:
        qfile = find_question_file(path) if path.is_dir() else path
        if media_dir is None:
            base = path if path.is_dir() else path.parent
            media_dir = next((d for d in (base / "data", base / "videos") if d.is_dir()), base)
        self.media_dir = media_dir
        items = []
        for k, row in enumerate(read_questions(qfile)):
            video = row.get("videoID") or row.get("video_id")
            qid = str(row.get("question_id") or f"{video}-{k}")
            options = row.get("options") or row.get("choices")
            item = Item(qid, row, {"answer": row.get("answer"), "video": video,
                                   **{g: row.get(g) for g in (*self.group_keys, "sub_category")}})
            missing = [f for f, v in (("video", video), ("question", row.get("question")), ("answer", row.get(
                "answer")), ("options", options)) if not v]
            if missing or not isinstance(options, list):
                item.error = f"{qfile.name} question {k}: missing or malformed {missing or ['options']}"
            items.append(item)
        return unique_ids(items)

    def limit(self, items: list[Item], n: int) -> list[Item]:
        return items[:n]

    def video_path(self, row: dict) -> Path:
        names = [n for n in (row.get("videoID"), row.get("video_id")) if n]
        for name in names:
            for ext in VIDEO_EXTS:
                if (self.media_dir / f"{name}{ext}").is_file():
                    return self.media_dir / f"{name}{ext}"
        raise SampleError(f"no video file for {' / '.join(map(str, names))} in {self.media_dir} "
                          f"(tried {', '.join(VIDEO_EXTS)})")

    def messages(self, item: Item) -> list[dict]:
        row = item.row
        opts = "\n".join(str(o) for o in (row.get("options") or row.get("choices")))
        text = PROMPT.format(question=row["question"], options=opts)
        return [{"role": "user", "content": [{"type": "video", "video": str(self.video_path(row))}, text]}]

    def score(self, item: Item, answer: str) -> dict:
        got = extract_letter(answer)
        return {"extracted": got, "score": float(got == str(item.meta["answer"]).strip())}

    def aggregate(self, records: list[dict]) -> dict:
        out = {"metric": self.metric, **group_means(records, self.group_keys)}
        answered = [r for r in records if r.get("error") is None and r.get("extracted")]
        official = group_means(answered, ("duration",))
        out.update(answered_n=official["n"], answered_overall=official["overall"],
                   answered_by_duration=official["by"].get("duration", {}))
        return out
