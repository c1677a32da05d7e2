"""Messages with images and videos -> model inputs (docs/architecture.md contract); token accounting without pixels.

A message is `{"role": ..., "content": str | list}`; a content list holds strings, `{"type": "text", "text": s}`,
PIL images, `{"type": "image", "image": PIL | path | bytes | uint8 array}` and
`{"type": "video", "video": path | bytes | VideoClip, fps=, max_frames=, packing=, max_visual_tokens=,
max_slice_nums=, use_image_id=}` (or `"frames": [PIL...]` + `"packages": [[temporal ids]...]` for frames you
decoded yourself). Items of one message are joined with "\\n", as the released `chat()` does. The released marker
`(<image>./</image>)` inside strings takes the next image of `images=[...]` (the counts must match).

Layout (spec 6.4, 7.3): each image is `[<image_id>i</image_id>]<image>Q*<unk></image>` + slice rows; a video is one
such block per package (per view index when frames are sliced), blocks joined by "\\n"; frames after the first of
a package add no text. Views are listed image by image; for a video, package by package, then view index, then
frame. Images default to the config's max_slice_nums / use_image_id; videos to max_slice_nums=1, use_image_id=False
(the 4.5 README's video settings, spec 6.5). Values given to the call apply to images and videos alike (as released);
a video item's own `max_slice_nums` / `use_image_id` win over both. A caller-decoded `VideoClip` keeps its frames
and plan (its fps / max_frames / packing / max_visual_tokens knobs are not re-applied).

Oddities of the release fixed on purpose (spec 10):
- 3: image ids number the placeholders that show an id, 0, 1, 2, ... in prompt order; the release counts every
  marker, including frames a package swallowed (0, 3, 6, ...). Identical for image-only prompts.
- 4: `<image_id>` follows `use_image_id` for every image, sliced or not, in training and inference alike (the
  release's finetune code only tagged sliced images; its inference tags all - we follow inference).
- 8: padding uses the tokenizer's pad id (`<|endoftext|>`) and the attention mask comes from lengths, so a prompt's
  own `!` (id 0) is never masked as padding.
- 9: `image_bound` is built while the ids are assembled and checked (one span of exactly query_num `<unk>` per
  package); a prompt longer than `max_length` raises instead of being truncated through a placeholder.
- 16/18: `images=None` works; channel layout is never guessed (see image.py), tiny images work.
Labels (when the conversation ends with an assistant turn and no generation prompt) come from chat.build_labels,
with every placeholder token ignored as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from vlmcook.config import MiniCPMVConfig
from vlmcook.data import chat
from vlmcook.data.image import (IMAGE_MARKER, ImageError, ImageLayout, describe, image_layout, image_placeholder,
                                image_size, load_image, normalize, view_images)

VIDEO_MARKER = "(<video>./</video>)"  # internal: where a video's blocks go in the rendered text
_MARKERS = re.compile(re.escape(IMAGE_MARKER) + "|" + re.escape(VIDEO_MARKER))
VIDEO_KNOBS = ("fps", "max_frames", "packing", "max_visual_tokens")
_VIDEO_KEYS = {"type", "video", "frames", "packages", "max_slice_nums", "use_image_id", *VIDEO_KNOBS}


@dataclass
class _Visual:
    """One image or video of a prompt, as collected from the messages."""

    kind: str  # "image" | "video"
    src: Any
    where: str  # "message 0 item 2", for error messages
    opts: dict = field(default_factory=dict)


@dataclass
class _Planned:
    """A visual after planning: its per-frame layout, packages and (when decoded) its views."""

    visual: _Visual
    layout: ImageLayout
    packages: list[list[int]]  # per placeholder block (video package), the temporal ids of its frames
    use_image_id: bool
    frames: list[Image.Image] | None = None  # decoded images / frames (None when only counting)
    spans: list[tuple[float, float]] | None = None  # video: (first, last) frame time of each package, seconds


@dataclass(frozen=True)
class VisualCount:
    kind: str
    where: str
    size: tuple[int, int]  # (W, H) of the image / of a frame
    views: int  # view tensors the vision tower encodes
    packages: int  # resampler outputs (query_num tokens each)
    visual_tokens: int  # <unk> slots
    placeholder_tokens: int  # all tokens of its placeholder text, <unk> slots included
    spans: list[tuple[float, float]] | None = None  # video: seconds covered by each placeholder block's package


@dataclass(frozen=True)
class TokenCount:
    total: int  # = input_ids.shape[1]
    visual_tokens: int  # <unk> slots the resampler fills
    text_tokens: int  # total - visual_tokens (placeholder tags included)
    views: int
    packages: int
    items: list[VisualCount]


class Processor:
    def __init__(self, tokenizer, config: MiniCPMVConfig):
        if tokenizer.vocab_size > config.llm.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{config.llm.vocab_size}")
        self.tokenizer, self.config = tokenizer, config
        self.query_num, self.patch = config.query_num, config.patch_size

    # ---- public API -------------------------------------------------------------------------------------------
    def __call__(self, messages: Sequence[dict], images: Sequence[Any] | None = None, thinking: bool | None = False,
                 max_slice_nums: int | None = None, use_image_id: bool | None = None,
                 add_generation_prompt: bool = True, max_length: int | None = None) -> dict[str, Any]:
        """One sample: input_ids / attention_mask [1, T], pixel_values [[views]], temporal_ids [[packages]],
        image_bound [LongTensor[n, 2]], and labels [1, T] when the conversation ends with an assistant turn and
        add_generation_prompt is False."""
        planned, ids, bounds, masked = self._build(messages, images, thinking, max_slice_nums, use_image_id,
                                                   add_generation_prompt, max_length, decode=True)
        views, packages = [], []
        for p in planned:
            v, pk = self._views(p)
            views += v
            packages += pk
        T = len(ids)
        out = {"input_ids": torch.tensor([ids], dtype=torch.long),
               "attention_mask": torch.ones(1, T, dtype=torch.long),
               "pixel_values": [views], "temporal_ids": [packages],
               "image_bound": [torch.tensor(bounds, dtype=torch.long).reshape(-1, 2)]}
        if messages[-1]["role"] == "assistant" and not add_generation_prompt:
            labels = chat.build_labels(ids, self.tokenizer)
            for s, e in masked:
                labels[s:e] = [chat.IGNORE_INDEX] * (e - s)
            out["labels"] = torch.tensor([labels], dtype=torch.long)
        return out

    def count_tokens(self, messages: Sequence[dict], images: Sequence[Any] | None = None,
                     thinking: bool | None = False, max_slice_nums: int | None = None,
                     use_image_id: bool | None = None, add_generation_prompt: bool = True,
                     max_length: int | None = None) -> TokenCount:
        """What `__call__` would produce, in tokens, from image headers and video probes only (no pixel decoding,
        no video frames)."""
        planned, ids, bounds, masked = self._build(messages, images, thinking, max_slice_nums, use_image_id,
                                                   add_generation_prompt, max_length, decode=False)
        items = []
        for p, (s, e) in zip(planned, masked):
            n_pk = len(p.packages) * p.layout.n_views
            items.append(VisualCount(p.visual.kind, p.visual.where, p.layout.size,
                                     sum(len(pk) for pk in p.packages) * p.layout.n_views, n_pk,
                                     n_pk * self.query_num, e - s, p.spans))
        visual = len(bounds) * self.query_num
        return TokenCount(len(ids), visual, len(ids) - visual, sum(i.views for i in items),
                          sum(i.packages for i in items), items)

    # ---- collecting -------------------------------------------------------------------------------------------
    def _collect(self, messages: Sequence[dict], images: Sequence[Any] | None) -> tuple[list[dict], list[_Visual]]:
        """Content lists -> strings with markers, plus the visuals in marker order."""
        if isinstance(messages, dict) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        queue = list(images or [])
        n_images, visuals, out = len(queue), [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
            content = m["content"]
            items = [content] if isinstance(content, str) else content
            if not isinstance(items, (list, tuple)):
                raise ValueError(f"message {i}: content must be a str or a list, got {type(content).__name__}")
            parts = [self._item(it, f"message {i} item {j}", queue, n_images, visuals) for j, it in enumerate(items)]
            out.append({**m, "content": "\n".join(parts)})
        if queue:
            raise ValueError(f"{n_images} images were given but the messages hold only {n_images - len(queue)} "
                             f"{IMAGE_MARKER} markers")
        return out, visuals

    def _item(self, it: Any, where: str, queue: list, n_images: int, visuals: list[_Visual]) -> str:
        if isinstance(it, str):
            if VIDEO_MARKER in it:
                raise ValueError(f"{where}: text contains the reserved string {VIDEO_MARKER!r}")
            for _ in range(it.count(IMAGE_MARKER)):
                if not queue:
                    raise ValueError(f"{where}: more {IMAGE_MARKER} markers than the {n_images} images given")
                visuals.append(_Visual("image", queue.pop(0), f"{where} (images[{n_images - len(queue) - 1}])"))
            return it
        if isinstance(it, Image.Image):
            visuals.append(_Visual("image", it, where))
            return IMAGE_MARKER
        if isinstance(it, dict) and it.get("type") == "text" and isinstance(it.get("text"), str):
            return self._item(it["text"], where, queue, n_images, visuals)
        if isinstance(it, dict) and it.get("type") == "image" and "image" in it:
            visuals.append(_Visual("image", it["image"], where))
            return IMAGE_MARKER
        if isinstance(it, dict) and it.get("type") == "video":
            unknown = set(it) - _VIDEO_KEYS
            if unknown or ("video" in it) == ("frames" in it):
                raise ValueError(f"{where}: a video item needs exactly one of 'video' / 'frames' and only the keys "
                                 f"{sorted(_VIDEO_KEYS)} (unknown: {sorted(unknown)})")
            visuals.append(_Visual("video", it.get("video", it.get("frames")), where,
                                   {k: v for k, v in it.items() if k not in ("type", "video", "frames")}))
            return VIDEO_MARKER
        raise ValueError(f"{where}: unsupported content item of type {type(it).__name__} (expected str, PIL image, "
                         f"{{'type': 'text'|'image'|'video', ...}})")

    # ---- planning ---------------------------------------------------------------------------------------------
    def _plan_image(self, v: _Visual, max_slice_nums: int, use_image_id: bool) -> _Planned:
        """From the header only: pixels are decoded in `_views`, after the prompt length has been checked."""
        size = image_size(v.src, f"{v.where}: {describe(v.src)}")
        layout = image_layout(size, self.config.scale_resolution, max_slice_nums, self.patch)
        return _Planned(v, layout, [[-1]], use_image_id)

    def _plan_video(self, v: _Visual, call_slices: int | None, call_use_id: bool | None, decode: bool) -> _Planned:
        from vlmcook.data import video as vid  # PyAV is an optional extra; only videos need it

        # item setting > explicit call setting (applied to every image and frame, as released) > README video default
        slices = int(v.opts.get("max_slice_nums", 1 if call_slices is None else call_slices))
        use_id = bool(v.opts.get("use_image_id", False if call_use_id is None else call_use_id))
        if slices < 1:
            raise ValueError(f"{v.where}: max_slice_nums must be >= 1, got {slices}")
        if isinstance(v.src, list) or "packages" in v.opts:  # frames decoded by the caller + their packages
            return self._plan_frames(v, slices, use_id)
        if hasattr(v.src, "frames") and hasattr(v.src, "plan"):  # a VideoClip decoded by the caller
            clip = v.src
            return self._planned_video(v, clip.frames, clip.plan, (clip.info.width, clip.info.height), slices, use_id)
        info = vid.probe_video(v.src)
        layout = image_layout((info.width, info.height), self.config.scale_resolution, slices, self.patch)
        knobs = {k: v.opts.get(k) for k in VIDEO_KNOBS}
        if knobs["max_visual_tokens"] is not None:
            per_package = layout.n_views * self.query_num
            if knobs["max_visual_tokens"] < per_package:
                raise ValueError(f"{v.where}: max_visual_tokens={knobs['max_visual_tokens']} cannot hold one "
                                 f"package ({layout.n_views} views x {self.query_num} tokens)")
            knobs["max_visual_tokens"] //= layout.n_views  # the video planner counts one view per frame
        if decode:
            clip = vid.load_video(v.src, query_num=self.query_num, **knobs)
            return self._planned_video(v, clip.frames, clip.plan, (clip.info.width, clip.info.height), slices, use_id)
        plan = vid.plan_frames(info, query_num=self.query_num, **knobs)
        return self._planned_video(v, None, plan, (info.width, info.height), slices, use_id)

    def _planned_video(self, v, frames, plan, size, slices, use_id) -> _Planned:
        if frames is not None and frames:
            size = frames[0].size  # decoded frames are the truth (e.g. rotation metadata)
        layout = image_layout(size, self.config.scale_resolution, slices, self.patch)
        times = dict(zip(plan.temporal_ids, plan.timestamps))
        spans = [(times[p[0]], times[p[-1]]) for p in plan.packages]
        return _Planned(v, layout, [list(p) for p in plan.packages], use_id, frames, spans)

    def _plan_frames(self, v: _Visual, slices: int, use_id: bool) -> _Planned:
        frames, packages = v.src, v.opts.get("packages")
        if not isinstance(frames, list) or not frames or not isinstance(packages, list):
            raise ValueError(f"{v.where}: a video given as frames needs 'frames' (a non-empty list of images) and "
                             f"'packages' (a list of temporal-id lists); 'packages' goes with 'frames' only")
        if any(not p or any(not isinstance(t, int) or t < 0 for t in p) for p in packages):
            raise ValueError(f"{v.where}: packages must be non-empty lists of temporal ids >= 0 (0.1 s units)")
        if sum(len(p) for p in packages) != len(frames):
            raise ValueError(f"{v.where}: packages hold {sum(len(p) for p in packages)} frames but "
                             f"{len(frames)} frames were given")
        frames = [load_image(f, f"{v.where} frame {k}") for k, f in enumerate(frames)]
        if len({f.size for f in frames}) > 1:
            raise ValueError(f"{v.where}: frames of one video must share one size, got "
                             f"{sorted({f.size for f in frames})}")
        longest = self.config.resampler.max_frames_per_package
        if max(len(p) for p in packages) > longest:
            raise ValueError(f"{v.where}: a package holds {max(len(p) for p in packages)} frames; the resampler "
                             f"takes at most {longest} (config.resampler.max_frames_per_package)")
        layout = image_layout(frames[0].size, self.config.scale_resolution, slices, self.patch)
        spans = [(p[0] / 10, p[-1] / 10) for p in packages]  # ids are 0.1 s units
        return _Planned(v, layout, [list(p) for p in packages], use_id, frames, spans)

    # ---- pixels -----------------------------------------------------------------------------------------------
    def _views(self, p: _Planned) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Views and packages in contract order: image views each a package [-1]; video package by package, then
        view index, then frame."""
        if p.visual.kind == "image":
            img = load_image(p.visual.src, f"{p.visual.where}: {describe(p.visual.src)}")
            if img.size != p.layout.size:
                raise ImageError(f"{p.visual.where}: decoded size {img.size} differs from the header's {p.layout.size}")
            views = [normalize(x) for x in view_images(img, p.layout)]
            return views, [[-1] for _ in views]
        per_frame = [[normalize(x) for x in view_images(f, p.layout)] for f in p.frames]
        views, packages, k = [], [], 0
        for pk in p.packages:
            group = per_frame[k:k + len(pk)]
            k += len(pk)
            for s in range(p.layout.n_views):
                views += [fv[s] for fv in group]
                packages.append(list(pk))
        return views, packages

    # ---- text and ids -----------------------------------------------------------------------------------------
    def _build(self, messages, images, thinking, max_slice_nums, use_image_id, add_generation_prompt, max_length,
               decode: bool):
        slices = self.config.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if slices < 1:
            raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
        use_id = self.config.use_image_id if use_image_id is None else bool(use_image_id)
        msgs, visuals = self._collect(messages, images)
        text = chat.render(msgs, add_generation_prompt=add_generation_prompt, thinking=thinking)
        chunks = _MARKERS.split(text)
        if len(chunks) - 1 != len(visuals):
            raise ValueError(f"the rendered prompt keeps {len(chunks) - 1} of {len(visuals)} images/videos: a marker "
                             f"inside an earlier assistant turn's reasoning is dropped by the chat template")
        planned = [self._plan_image(v, slices, use_id) if v.kind == "image"
                   else self._plan_video(v, max_slice_nums, use_image_id, decode) for v in visuals]
        ids, bounds, masked, next_id = self.tokenizer.encode(chunks[0]), [], [], 0
        for p, chunk in zip(planned, chunks[1:]):
            start = len(ids)
            blocks = []
            for _ in p.packages:
                blocks.append(image_placeholder(p.layout.grid, self.query_num, next_id if p.use_image_id else None))
                next_id += p.use_image_id
            ids += self._placeholder_ids("\n".join(blocks), start, bounds, p)
            masked.append((start, len(ids)))
            ids += self.tokenizer.encode(chunk)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"the prompt is {len(ids)} tokens, more than max_length={max_length} (never truncated: "
                             f"that could cut an image placeholder); use fewer/smaller images or fewer frames")
        return planned, ids, bounds, masked

    def _placeholder_ids(self, text: str, offset: int, bounds: list, p: _Planned) -> list[int]:
        """Encode a placeholder and record its `<unk>` runs as [start, end) bounds, each exactly query_num long."""
        ids = self.tokenizer.encode(text)
        unk, i, n_runs = self.tokenizer.unk_id, 0, 0
        while i < len(ids):
            if ids[i] == unk:
                j = i
                while j < len(ids) and ids[j] == unk:
                    j += 1
                if j - i != self.query_num:
                    raise AssertionError(f"{p.visual.where}: placeholder run of {j - i} <unk>, not {self.query_num}")
                bounds.append((offset + i, offset + j))
                n_runs += 1
                i = j
            else:
                i += 1
        assert n_runs == len(p.packages) * p.layout.n_views, (n_runs, len(p.packages), p.layout.n_views)
        return ids


def collate(samples: Sequence[dict], pad_id: int, padding_side: str = "left") -> dict[str, Any]:
    """Batch processor outputs: pad input_ids with `pad_id`, attention_mask with 0, labels with -100, and shift
    each sample's image_bound by its left padding. Left padding for generation, right for training."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not samples:
        raise ValueError("collate: no samples")
    has_labels = {"labels" in s for s in samples}
    if len(has_labels) > 1:
        raise ValueError("collate: some samples have labels and some do not")
    T = max(s["input_ids"].shape[1] for s in samples)
    out = {"input_ids": [], "attention_mask": [], "labels": [], "pixel_values": [], "temporal_ids": [],
           "image_bound": []}
    for b, s in enumerate(samples):
        if s["input_ids"].shape[0] != 1:
            raise ValueError(f"collate: sample {b} has batch size {s['input_ids'].shape[0]}, expected 1")
        n = s["input_ids"].shape[1]
        pad = T - n
        left = pad if padding_side == "left" else 0
        for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("labels", chat.IGNORE_INDEX)):
            if key in s:
                row = torch.full((T,), value, dtype=torch.long)
                row[left:left + n] = s[key][0]
                out[key].append(row)
        out["pixel_values"] += s["pixel_values"]
        out["temporal_ids"] += s["temporal_ids"]
        out["image_bound"] += [bd + left for bd in s["image_bound"]]
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = torch.stack(out[key]) if out[key] else None
    if out["labels"] is None:
        del out["labels"]
    return out
