"""Training samples from corrupted pages: prompt + target in the project's SFT chat format.

- Record: `{"id", "images": [relative path], "messages": [user, assistant], "meta"}`; the user turn starts with
  the released image marker `(<image>./</image>)` (one per image, in order) and a newline.
- Two tasks (the paper does not say how prompts name regions: our choices, weights configurable):
  - "page": transcribe the whole page in reading order, restoring damaged / hidden text; region texts separated by
    blank lines, a table's cells as `| a | b |` rows.
  - "regions": the prompt lists the corrupted regions as `<box>x1 y1 x2 y2</box>` (the released grounding format,
    docs/architecture.md "Document data"); the target is one `<ref>original text</ref><box>...</box>` line per
    region, in prompt order.
- Targets are always the original text; which regions were corrupted at which level is in `meta`.
- `make_sample` is pure given (page, seed, configs): wording and task come from `rngs(seed, "sample", page.source)`.
  Writing (JSONL + images, in parallel) lives in pipeline.py; streaming in stream.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmcook.data.docs.corrupt import LEVELS, CorruptConfig, Corrupted, corrupt_page
from vlmcook.data.docs.page import Page, Region, rngs, split_lines
from vlmcook.data.image import IMAGE_MARKER

TASKS = ("page", "regions")

_PAGE_PROMPTS = (
    "Transcribe all the text on this page in reading order. Some regions are damaged or hidden; write their "
    "original text.",
    "Read this document page and write out its full text. Restore any text that is blurred, broken or covered.",
    "What does this page say? Give the complete text in reading order, including parts that are hard to read or "
    "masked.",
)
_REGION_PROMPTS = (
    "Read the text in each of these regions. Some are damaged or hidden; give their original text.",
    "Transcribe the text inside the following boxes, restoring any text that is illegible or covered.",
    "For each region below, write the text it contains, inferring damaged or masked text from the context.",
)


@dataclass(frozen=True)
class SampleConfig:
    tasks: tuple[str, ...] = TASKS
    task_weights: tuple[float, ...] = (0.5, 0.5)
    unit: str = "block"  # "block" = paragraph / item / cell regions; "line" = one region per text line

    def __post_init__(self):
        if not self.tasks or any(t not in TASKS for t in self.tasks) or len(self.task_weights) != len(self.tasks):
            raise ValueError(f"tasks {self.tasks} / weights {self.task_weights}: tasks must be from {TASKS}, "
                             "one weight each")
        if self.unit not in ("block", "line"):
            raise ValueError(f"unit {self.unit!r} must be 'block' or 'line'")


def norm_box(bbox, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel (x1, y1, x2, y2) -> integers in 0..1000 relative to the image (w, h)."""
    w, h = size
    x1, y1, x2, y2 = bbox
    return tuple(min(1000, max(0, round(v * 1000 / d))) for v, d in ((x1, w), (y1, h), (x2, w), (y2, h)))


def box_tag(bbox, size) -> str:
    return "<box>{} {} {} {}</box>".format(*norm_box(bbox, size))


def page_text(regions: list[Region]) -> str:
    """Region texts in reading order, blank-line separated; consecutive cells of one table become markdown rows."""
    blocks: list = []  # str, or a table as a list of rows (lists of cell texts)
    prev = None
    for r in sorted(regions, key=lambda r: r.order):
        if r.cell is None:
            blocks.append(r.text)
        elif prev is not None and prev[0] == r.cell[0]:  # same table: same row or a new row
            rows = blocks[-1]
            rows[-1].append(r.text) if prev[1] == r.cell[1] else rows.append([r.text])
        else:
            blocks.append([[r.text]])
        prev = r.cell
    return "\n\n".join(b if isinstance(b, str) else "\n".join("| " + " | ".join(row) + " |" for row in b)
                       for b in blocks)


def make_sample(page: Page, seed: int, ccfg: CorruptConfig = CorruptConfig(),
                scfg: SampleConfig = SampleConfig()) -> tuple[dict, Corrupted]:
    """(record without "images", corruption) for one page; the caller stores `Corrupted.image`."""
    if scfg.unit == "line":
        page = split_lines(page)
    cor = corrupt_page(page, seed, ccfg)
    rng, _ = rngs(seed, "sample", page.source)
    task = rng.choices(scfg.tasks, weights=scfg.task_weights)[0]
    size = page.image.size
    if task == "regions" and cor.levels:
        chosen = [r for r in page.in_reading_order() if r.order in cor.levels]
        prompt = rng.choice(_REGION_PROMPTS) + "\n" + "\n".join(box_tag(r.bbox, size) for r in chosen)
        target = "\n".join(f"<ref>{r.text}</ref>{box_tag(r.bbox, size)}" for r in chosen)
    else:
        task = "page"
        prompt, target = rng.choice(_PAGE_PROMPTS), page_text(page.regions)
    record = {
        "id": page.source,
        "messages": [{"role": "user", "content": f"{IMAGE_MARKER}\n{prompt}"},
                     {"role": "assistant", "content": target}],
        "meta": _meta(page, cor, task, seed),
    }
    return record, cor


def _meta(page: Page, cor: Corrupted, task: str, seed: int) -> dict:
    counts = {lv: sum(1 for v in cor.levels.values() if v == lv) for lv in LEVELS}
    regions = [{"order": r.order, "kind": r.kind, "bbox": list(r.bbox), "box": list(norm_box(r.bbox, page.image.size)),
                "level": cor.levels.get(r.order), "text": r.text} for r in page.in_reading_order()]
    return {"source": page.source, "task": task, "seed": seed, "size": list(page.image.size), "levels": counts,
            "regions": regions, "page": page.meta}


def save_image(img: Image.Image, path: Path, fmt: str = "png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "png":
        img.save(path, "PNG", compress_level=1)  # ~1.6x faster than the default level for ~10% more bytes
    elif fmt == "jpg":
        img.save(path, "JPEG", quality=92)
    else:
        raise ValueError(f"image format {fmt!r} must be 'png' or 'jpg'")
