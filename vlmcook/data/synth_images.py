"""Synthetic image QA / captions and text-only QA, seeded, in the project's SFT record format.

Notable:
- Pure: record i is a function of (seed, i) (`random.Random` seeded by a string: stable across runs / processes).
- `SynthImageQA` tasks, short exact answers: "caption" (every shape, left to right: "a red disc, a blue square"),
  "count" (how many discs / squares / triangles), "colour" (colour of the only <kind>), "position" (is the <colour>
  <kind> on the left or the right half), "word" (a rendered word, DejaVu font when present, else Pillow's default).
  Shapes never overlap (rejection sampling on their boxes), so every answer is visible in the pixels.
- `SynthText`: text-only turns (small-number arithmetic, comparisons, word reversal, colour facts), so a mixture
  keeps the language side trained.
- In memory the record's "images" hold PIL images; `write(folder, n)` saves PNGs and a `data.jsonl` with relative
  paths (the JSONL format of vlmcook/train/data.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmcook.data.image import IMAGE_MARKER

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
           "white": (245, 245, 245), "purple": (170, 60, 210)}
BACKGROUND = (25, 25, 25)
KINDS = ("disc", "square", "triangle")
IMAGE_TASKS = ("caption", "count", "colour", "position", "word")
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "milk", "star", "boat", "lamp", "moon", "rain", "door",
         "bird", "cake", "ring")


def _rng(kind: str, seed: int, i: int) -> random.Random:
    return random.Random(f"{kind}:{seed}:{i}")


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def _place(rng: random.Random, boxes: list, W: int, H: int, r: int) -> tuple[int, int] | None:
    """A centre whose box (with a margin) overlaps no earlier box; None after 200 tries."""
    for _ in range(200):
        x, y = rng.randint(r + 2, W - r - 3), rng.randint(r + 2, H - r - 3)
        if all(abs(x - bx) > r + br + 4 or abs(y - by) > r + br + 4 for bx, by, br in boxes):
            return x, y
    return None


def _draw(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, r: int, colour: str) -> None:
    fill = COLOURS[colour]
    if kind == "disc":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif kind == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def shapes_scene(rng: random.Random, size: tuple[int, int], n: int) -> list[tuple[str, str, int, int, int]]:
    """n non-overlapping (kind, colour, x, y, r) with distinct x centres."""
    W, H = size
    out, boxes = [], []
    while len(out) < n:
        r = rng.randint(9, 14)
        pos = _place(rng, boxes, W, H, r)
        if pos is None:
            break
        if any(abs(pos[0] - o[2]) < 3 for o in out):
            continue
        out.append((rng.choice(KINDS), rng.choice(list(COLOURS)), pos[0], pos[1], r))
        boxes.append((pos[0], pos[1], r))
    return out


def render_shapes(shapes, size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    for kind, colour, x, y, r in shapes:
        _draw(draw, kind, x, y, r, colour)
    return img


def image_qa(seed: int, i: int, size: tuple[int, int] = (160, 120),
             tasks: tuple[str, ...] = IMAGE_TASKS) -> tuple[Image.Image, str, str, dict]:
    """-> (image, question, answer, meta) of sample i."""
    if not tasks or any(t not in IMAGE_TASKS for t in tasks):
        raise ValueError(f"tasks {tasks} must be a non-empty subset of {IMAGE_TASKS}")
    rng = _rng("synth_image", seed, i)
    task = rng.choice(tasks)
    if task == "word":
        word = rng.choice(WORDS)
        img = Image.new("RGB", size, BACKGROUND)
        draw = ImageDraw.Draw(img)
        font = _font(rng.randint(26, 34))
        l, t, r, b = draw.textbbox((0, 0), word, font=font)
        x, y = rng.randint(2, max(2, size[0] - (r - l) - 2)), rng.randint(2, max(2, size[1] - (b - t) - 2))
        draw.text((x - l, y - t), word, font=font, fill=COLOURS[rng.choice(list(COLOURS))])
        return img, "What word is written in the image?", word, {"task": task, "word": word}
    shapes = shapes_scene(rng, size, 1 if task in ("colour", "position") else rng.randint(1, 5))
    img = render_shapes(shapes, size)
    meta = {"task": task, "shapes": [list(s) for s in shapes]}
    kind, colour, x = shapes[0][0], shapes[0][1], shapes[0][2]
    if task == "caption":
        answer = ", ".join(f"a {c} {k}" for k, c, *_ in sorted(shapes, key=lambda s: s[2]))
        return img, "List the shapes from left to right.", answer, meta
    if task == "count":
        kind = rng.choice(KINDS)
        n = sum(s[0] == kind for s in shapes)
        return img, f"How many {kind}s are there? Answer with a number.", str(n), meta
    if task == "colour":
        return img, f"What colour is the {kind}? Answer with one word.", colour, meta
    side = "left" if x < size[0] / 2 else "right"
    return img, f"Is the {colour} {kind} on the left or the right?", side, meta


def text_qa(seed: int, i: int) -> tuple[str, str]:
    """-> (question, answer) of text sample i."""
    rng = _rng("synth_text", seed, i)
    task = rng.randrange(4)
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if task == 0:
        op = rng.choice("+-")
        return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)
    if task == 1:
        return f"Which is larger, {a} or {b}?", str(max(a, b)) if a != b else "they are equal"
    if task == 2:
        word = rng.choice(WORDS)
        return f"Spell the word '{word}' backwards.", word[::-1]
    thing, colour = rng.choice([("grass", "green"), ("snow", "white"), ("a banana", "yellow"),
                                ("the sky on a clear day", "blue"), ("a ripe tomato", "red")])
    return f"What colour is {thing}?", colour


def _chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def write_jsonl(folder: str | Path, indices, one, media: str | None = None) -> Path:
    """`folder/data.jsonl` with one record per index: one(i, folder) -> record (writing its media files under
    `folder/<media>/`, created here, with paths relative to folder); returns the JSONL path."""
    folder = Path(folder)
    (folder / media if media else folder).mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in indices:
            f.write(json.dumps(one(i, folder)) + "\n")
    return path


class SynthImageQA:
    """Seeded image QA records; `record(i)` holds a PIL image, `write` saves PNGs + data.jsonl."""

    def __init__(self, seed: int = 0, n: int = 10_000, size: tuple[int, int] = (160, 120),
                 tasks: tuple[str, ...] = IMAGE_TASKS):
        self.seed, self.n, self.size, self.tasks = seed, n, tuple(size), tuple(tasks)

    def __len__(self) -> int:
        return self.n

    def _record(self, i: int, image) -> tuple[dict, Image.Image]:
        img, q, a, meta = image_qa(self.seed, i, self.size, self.tasks)
        rec = {"id": f"image-{self.seed}-{i}", "images": [img if image is None else image],
               "messages": _chat(f"{IMAGE_MARKER}\n{q}", a), "meta": meta}
        return rec, img

    def record(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside [0, {self.n})")
        return self._record(i, None)[0]

    __getitem__ = record

    def write(self, folder: str | Path, n: int | None = None, start: int = 0) -> Path:
        def one(i: int, folder: Path) -> dict:
            rel = f"images/image-{self.seed}-{i}.png"
            rec, img = self._record(i, rel)
            img.save(folder / rel)
            return rec
        return write_jsonl(folder, range(start, start + (self.n - start if n is None else n)), one, "images")


class SynthText:
    """Seeded text-only records (no images)."""

    def __init__(self, seed: int = 0, n: int = 10_000):
        self.seed, self.n = seed, n

    def __len__(self) -> int:
        return self.n

    def record(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside [0, {self.n})")
        q, a = text_qa(self.seed, i)
        return {"id": f"text-{self.seed}-{i}", "messages": _chat(q, a), "meta": {"task": "text"}}

    __getitem__ = record

    def write(self, folder: str | Path, n: int | None = None, start: int = 0) -> Path:
        return write_jsonl(folder, range(start, start + (self.n - start if n is None else n)),
                           lambda i, _: self.record(i))
