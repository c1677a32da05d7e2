"""Synthetic video QA whose answers need time: a seeded source of small mp4 clips + questions, in the SFT format.

Notable:
- Pure: `scene(seed, i)` (frames, mp4 bytes for a codec, question, answer, `caption`) is a function of (seed, i).
- Four tasks, one-word answers (exact accuracy), none answerable from a single frame or from the video's length:
  * "order":   three coloured discs appear one after another (never together); which came first / second / last?
  * "count":   a disc flashes k = 1..5 times at random places and times in a 9.5-10.5 s video; how many times?
  * "motion":  a square crosses the frame left / right / up / down (a static disc of another colour distracts)
  * "at_time": a central square changes colour every second; what colour is it at k.5 seconds?
- Events last >= 0.8 s and gaps >= 0.6 s, so >= 2 frames a second see every appearance and gap; colours are
  saturated and far apart, so they survive yuv420p compression (tests recover each answer from decoded pixels).
- Frames are Pillow drawings at `size` (even sides), written with PyAV at `fps` (libx264, else mpeg4).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from vlmcook.data.processor import VIDEO_MARKER
from vlmcook.data.synth_images import BACKGROUND, COLOURS, write_jsonl  # one palette for images and videos

TASKS = ("order", "count", "motion", "at_time")
DIRECTIONS = ("left", "right", "up", "down")


@dataclass(frozen=True)
class Shape:
    """One drawn object: `kind` disc|square, colour name, visible on [t0, t1), centre moving linearly (x0,y0)->(x1,y1)
    over that interval (fractions of the frame), radius as a fraction of the shorter side."""

    kind: str
    colour: str
    t0: float
    t1: float
    x0: float
    y0: float
    x1: float
    y1: float
    radius: float = 0.14


@dataclass(frozen=True)
class Scene:
    task: str
    duration: float  # seconds
    shapes: tuple[Shape, ...]
    question: str
    answer: str
    facts: dict = field(default_factory=dict)  # task-specific ground truth, stored in the record's meta


def _rng(seed: int, i: int, what: str) -> random.Random:
    return random.Random(f"synth_video:{seed}:{i}:{what}")


def _flash_times(rng: random.Random, k: int, start: float) -> list[tuple[float, float]]:
    """k non-overlapping appearances: on 0.8-1.1 s, off 0.6-0.9 s between them."""
    times, t = [], start
    for _ in range(k):
        on = rng.uniform(0.8, 1.1)
        times.append((round(t, 2), round(t + on, 2)))
        t += on + rng.uniform(0.6, 0.9)
    return times


def _scene_order(rng: random.Random) -> Scene:
    colours = rng.sample(list(COLOURS), 3)
    times = _flash_times(rng, 3, rng.uniform(0.2, 0.8))
    shapes = tuple(Shape("disc", c, a, b, x, y, x, y) for c, (a, b) in zip(colours, times)
                   for x, y in [(rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75))])
    which = rng.randrange(3)
    word = ("first", "second", "last")[which]
    q = f"Three discs appear one after another. Which colour appeared {word}? Answer with one word."
    return Scene("order", times[-1][1] + rng.uniform(0.3, 0.8), shapes, q, colours[which], {"order": colours})


# Every count video lasts this long whatever its count, so its length tells nothing (5 flashes take at most 9.1 s).
COUNT_DURATION = (9.5, 10.5)


def _scene_count(rng: random.Random) -> Scene:
    colour, k = rng.choice(list(COLOURS)), rng.randint(1, 5)
    duration = rng.uniform(*COUNT_DURATION)
    times = _flash_times(rng, k, 0.0)
    # spread the k flashes over the whole video: the unused time goes, in random shares, before, between and after
    spare = duration - 0.3 - times[-1][1]  # >= 0.1
    cuts = sorted(rng.uniform(0, spare) for _ in range(k))
    times = [(round(a + c, 2), round(b + c, 2)) for (a, b), c in zip(times, cuts)]
    shapes = tuple(Shape("disc", colour, a, b, x, y, x, y) for a, b in times
                   for x, y in [(rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75))])
    q = f"How many times did the {colour} disc appear? Answer with a number."
    return Scene("count", duration, shapes, q, str(k), {"count": k, "colour": colour})


def _scene_motion(rng: random.Random) -> Scene:
    colour, other = rng.sample(list(COLOURS), 2)
    d, duration = rng.choice(DIRECTIONS), rng.uniform(3.0, 6.0)
    a, b, c = 0.18, 0.82, rng.uniform(0.3, 0.7)
    start, end = {"left": ((b, c), (a, c)), "right": ((a, c), (b, c)), "up": ((c, b), (c, a)),
                  "down": ((c, a), (c, b))}[d]
    sx, sy = (0.2, 0.2) if d in ("right", "down") else (0.8, 0.8)  # distractor in a corner the square avoids
    shapes = (Shape("square", colour, 0.0, duration + 1, *start, *end, radius=0.12),
              Shape("disc", other, 0.0, duration + 1, sx, sy, sx, sy, radius=0.08))
    q = f"In which direction does the {colour} square move: left, right, up or down?"
    return Scene("motion", duration, shapes, q, d, {"direction": d, "colour": colour})


def _scene_at_time(rng: random.Random) -> Scene:
    n = rng.randint(3, 7)
    colours = [rng.choice(list(COLOURS))]
    while len(colours) < n:
        colours.append(rng.choice([c for c in COLOURS if c != colours[-1]]))
    shapes = tuple(Shape("square", c, float(s), float(s + 1), 0.5, 0.5, 0.5, 0.5, radius=0.25)
                   for s, c in enumerate(colours))
    k = rng.randrange(n)
    q = f"The square changes colour every second. What colour is it at {k}.5 seconds? Answer with one word."
    return Scene("at_time", float(n), shapes, q, colours[k], {"colours": colours, "second": k})


def caption(sc: Scene) -> str:
    """What happens, in order, as a video caption: the events of the scene joined by ", then " (order / count: each
    appearance of a disc; at_time: the square's colour each second; motion: where the square goes)."""
    if sc.task == "motion":
        square, disc = sc.shapes
        return f"{square.colour} square moves {sc.facts['direction']}, {disc.colour} disc stays."
    if sc.task == "at_time":
        return ", then ".join(sc.facts["colours"]) + "."
    return ", then ".join(f"{s.colour} disc" for s in sorted(sc.shapes, key=lambda s: s.t0)) + "."


CAPTION_PROMPT = "Describe what happens in the video, in order."


def timeline(sc: Scene) -> str:
    """Second by second, what the video shows: "k: <what>" for every second k. order / count: the discs that appear
    in [k, k+1) ("red disc appears", "-" for none); at_time: the square's colour; motion: the square's third of the
    frame at k + 0.5 s. The reasoning of a long-mode answer (one line per package of a one-package-per-second
    video): the answer is then read off the lines (the appearances in order, their number, line k, the thirds)."""
    lines = []
    for k in range(math.ceil(sc.duration - 1e-9)):
        if sc.task == "motion":
            sq = sc.shapes[0]
            f = min(1.0, (k + 0.5) / sc.duration)
            horizontal = sc.facts["direction"] in ("left", "right")
            x = sq.x0 + f * (sq.x1 - sq.x0) if horizontal else sq.y0 + f * (sq.y1 - sq.y0)
            third = ("left", "middle", "right") if horizontal else ("top", "middle", "bottom")
            what = f"{sq.colour} square {third[min(2, int(3 * x))]}"
        elif sc.task == "at_time":
            what = sc.facts["colours"][k]
        else:
            what = " and ".join(f"{sh.colour} disc appears" for sh in sorted(sc.shapes, key=lambda sh: sh.t0)
                                if k <= sh.t0 < k + 1) or "-"
        lines.append(f"{k}: {what}")
    return "\n".join(lines)


_BUILDERS = {"order": _scene_order, "count": _scene_count, "motion": _scene_motion, "at_time": _scene_at_time}


def scene(seed: int, i: int, tasks: tuple[str, ...] = TASKS) -> Scene:
    """The i-th scene of a seeded stream; the task cycles through `tasks` by a seeded draw."""
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks {tasks} must be a non-empty subset of {TASKS}")
    rng = _rng(seed, i, "scene")
    return _BUILDERS[rng.choice(tasks)](rng)


def render_frame(sc: Scene, t: float, size: tuple[int, int]) -> Image.Image:
    """The frame shown at time t (seconds): every shape visible at t, at its interpolated position."""
    W, H = size
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in sc.shapes:
        if not s.t0 <= t < s.t1:
            continue
        f = min(1.0, (t - s.t0) / max(1e-6, min(s.t1, sc.duration) - s.t0))
        cx, cy = (s.x0 + f * (s.x1 - s.x0)) * W, (s.y0 + f * (s.y1 - s.y0)) * H
        r = s.radius * min(W, H)
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if s.kind == "disc" else draw.rectangle)(box, fill=COLOURS[s.colour])
    return img


def render_frames(sc: Scene, fps: float, size: tuple[int, int]) -> list[Image.Image]:
    """Frame j shows time j / fps; round(duration * fps) frames."""
    return [render_frame(sc, j / fps, size) for j in range(max(1, round(sc.duration * fps)))]


def to_yuv420p(img: Image.Image) -> "np.ndarray":
    """RGB -> yuv420p planes in integer numpy ([H * 3/2, W] uint8: Y, then U and V of 2x2-averaged pixels), BT.601
    limited range, the conversion FFmpeg's swscale does by default. Ours so that no library picks a code path: a
    video's bytes are then a function of its frames (two demo runs once got 2 of 1500 videos encoded differently
    when PyAV converted, reports/video.md section 6)."""
    import numpy as np

    rgb = np.asarray(img.convert("RGB"), dtype=np.int32)  # [H, W, 3]
    H, W = rgb.shape[:2]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    q = rgb.reshape(H // 2, 2, W // 2, 2, 3).sum(axis=(1, 3))  # 2x2 sums [H/2, W/2, 3], 4x the mean
    r, g, b = q[..., 0], q[..., 1], q[..., 2]
    u = ((-38 * r - 74 * g + 112 * b + 512) >> 10) + 128
    v = ((112 * r - 94 * g - 18 * b + 512) >> 10) + 128
    return np.concatenate([y.ravel(), u.ravel(), v.ravel()]).astype(np.uint8).reshape(H * 3 // 2, W)


def encode_mp4(frames: list[Image.Image], fps: float, codec: str | None = None) -> bytes:
    """Frames -> mp4 bytes (yuv420p, converted by `to_yuv420p`) with PyAV; codec libx264 when available, else mpeg4
    (even sides)."""
    import av
    from fractions import Fraction

    codecs = [codec] if codec else ["libx264", "mpeg4"]
    for name in codecs:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - PyAV raises different types per version for unknown codecs
            continue
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as out:
            stream = out.add_stream(name, rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = frames[0].size
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"} if name == "libx264" else {}
            if name == "mpeg4":
                stream.bit_rate = 2_000_000
            for img in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(to_yuv420p(img), format="yuv420p")))
            out.mux(stream.encode())
        return buf.getvalue()
    raise RuntimeError(f"none of the video encoders {codecs} is available in this PyAV build")


class SynthVideoQA:
    """Seeded synthetic video QA records (SFT format). `record(i)` builds sample i in memory (mp4 bytes in
    videos[0]['path']); `write(folder, n)` writes mp4 files + `data.jsonl`.

    `sample_fps` / `packing` go into each record's video entry (how the processor samples and groups frames).
    `captions=True`: the same videos with a caption target (`caption`) instead of the question. `reasoning=True`:
    the answer comes after a think block holding the `timeline` (the long mode of the hybrid recipe)."""

    def __init__(self, seed: int = 0, n: int = 10_000, size: tuple[int, int] = (112, 112), fps: float = 10.0,
                 tasks: tuple[str, ...] = TASKS, sample_fps: float = 4.0, packing: int | None = None,
                 codec: str | None = None, captions: bool = False, reasoning: bool = False):
        if size[0] % 2 or size[1] % 2:
            raise ValueError(f"size {size}: sides must be even (yuv420p)")
        if sample_fps > fps:
            raise ValueError(f"sample_fps {sample_fps} is above the video's fps {fps}")
        self.seed, self.n, self.size, self.fps, self.tasks = seed, n, tuple(size), fps, tuple(tasks)
        self.sample_fps, self.packing, self.codec, self.captions = sample_fps, packing, codec, captions
        self.reasoning = reasoning

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        return scene(self.seed, i, self.tasks)

    def video_bytes(self, i: int) -> bytes:
        return encode_mp4(render_frames(self.scene(i), self.fps, self.size), self.fps, self.codec)

    def _record(self, i: int, path) -> dict:
        sc = self.scene(i)
        video = {"path": path, "fps": self.sample_fps}
        if self.packing is not None:
            video["packing"] = self.packing
        q, a = (CAPTION_PROMPT, caption(sc)) if self.captions else (sc.question, sc.answer)
        if self.reasoning:
            a = f"<think>\n{timeline(sc)}\n</think>\n\n{a}"
        return {"id": f"video-{self.seed}-{i}", "videos": [video],
                "messages": [{"role": "user", "content": f"{VIDEO_MARKER}\n{q}"},
                             {"role": "assistant", "content": a}],
                "meta": {"task": sc.task, "answer": sc.answer, "duration": sc.duration, "fps": self.fps,
                         **sc.facts}}

    def record(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside [0, {self.n})")
        return self._record(i, self.video_bytes(i))

    __getitem__ = record

    def write(self, folder: str | Path, n: int | None = None, start: int = 0) -> Path:
        """Write records start..start+n-1 as `videos/<id>.mp4` + `data.jsonl`; returns the JSONL path."""
        def one(i: int, folder: Path) -> dict:
            rel = f"videos/video-{self.seed}-{i}.mp4"
            (folder / rel).write_bytes(self.video_bytes(i))
            return self._record(i, rel)
        return write_jsonl(folder, range(start, start + (self.n - start if n is None else n)), one, "videos")
