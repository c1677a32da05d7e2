"""Messages with images and videos -> model inputs: the one place where user input is validated.

Everything a caller can get wrong (message shapes, content parts, media files, video knobs, prompt length) is
checked here, once, and raised as a `ValueError` subclass naming where (`message 0 item 2`); the API, the CLI, the
server and the training data pass inputs through and only map these errors. Formats, defaults and the layout of
placeholders and views: docs/architecture.md ("Processor input" and the data contract).

Notable:
- Placeholder ids and their `<unk>` spans are built directly from the tokenizer's special ids (no text round trip);
  a test checks them against tokenizing the released placeholder text (`image.image_placeholder`).
- Token counts (`count_tokens`) and the context check come from image headers and video probes: a prompt that does
  not fit raises `ContextLengthError` before any pixel is decoded; each video file is opened once per call.
- Release oddities fixed on purpose (docs/reference.md 10): image ids count the placeholders that show one (10.3);
  `<image_id>` follows `use_image_id` for every image (10.4); a prompt over the limit raises, never truncates
  (10.9); `images=None` works and tiny images work (10.16, 10.18).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from vlmcook.config import MiniCPMVConfig
from vlmcook.data import chat
from vlmcook.data import video as vid  # limits and the opened file; PyAV itself is imported only to open a video
from vlmcook.data.image import IMAGE_MARKER, ImageError, ImageLayout, describe, image_layout, image_size, load_image, \
    normalize, view_images

VIDEO_MARKER = "(<video>./</video>)"  # where a video goes in a text, as IMAGE_MARKER for an image
_MARKERS = re.compile(re.escape(IMAGE_MARKER) + "|" + re.escape(VIDEO_MARKER))
VIDEO_KNOBS = ("fps", "max_frames", "packing", "max_visual_tokens")  # how a video file is sampled and packed
_PART_KEYS = {"text": {"type", "text"}, "image": {"type", "image"},
              "video": {"type", "video", "frames", "packages", "max_slice_nums", "use_image_id", *VIDEO_KNOBS}}
_MESSAGE_KEYS = {"role", "content", "reasoning_content"}
MAX_TEMPORAL_ID = 10**7  # 0.1 s units: 11 days of video (the released table holds 2 hours and grows on demand)


class ContextLengthError(ValueError):
    """The prompt (+ the tokens reserved for generation) does not fit; raised before any pixel is decoded."""

    def __init__(self, prompt_tokens: int, max_length: int, reserve: int = 0, at_least: bool = False):
        self.prompt_tokens, self.max_length, self.reserve, self.at_least = prompt_tokens, max_length, reserve, at_least
        room = f"{max_length} tokens" if not reserve else f"{max_length - reserve} tokens ({max_length} minus " \
                                                          f"{reserve} reserved for the answer)"
        super().__init__(f"the prompt is {'at least ' * at_least}{prompt_tokens} tokens, more than the {room}; use "
                         f"fewer or smaller images, fewer video frames (fps / max_frames / packing), or a shorter "
                         f"text (never truncated: that could cut an image placeholder)")


@dataclass
class _Visual:
    """One image or video of a prompt, as collected from the messages."""

    kind: str  # "image" | "video"
    src: Any
    where: str  # "message 0 item 2", for error messages
    opts: dict = field(default_factory=dict)  # video: knobs, max_slice_nums, use_image_id, packages


@dataclass
class _Planned:
    """A visual after planning from headers: its per-frame layout, packages, and how to get its pixels."""

    visual: _Visual
    layout: ImageLayout
    packages: list[list[int]]  # per placeholder block (video package), the temporal ids of its frames
    use_image_id: bool
    frames: list[Image.Image] | None = None  # caller-decoded frames (or a VideoClip's)
    plan: Any = None  # video file: the FramePlan to decode
    spans: list[tuple[float, float]] | None = None  # video: (first, last) frame time of each package, seconds
    pixels: int = 0  # decoded RGB pixels this visual will hold
    file: Any = None  # video file: the opened VideoFile (probed once, decoded from the same container)


@dataclass(frozen=True)
class VisualCount:
    kind: str
    where: str
    size: tuple[int, int]  # (W, H) of the image / of a frame
    views: int  # view tensors the vision tower encodes
    packages: int  # resampler outputs (query_num tokens each)
    visual_tokens: int  # <unk> slots
    placeholder_tokens: int  # all tokens of its placeholder, <unk> slots included
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
    def __init__(self, tokenizer, config: MiniCPMVConfig, max_decoded_bytes: int = vid.MAX_DECODED_BYTES):
        if tokenizer.vocab_size > config.llm.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{config.llm.vocab_size}")
        self.tokenizer, self.config, self.max_decoded_bytes = tokenizer, config, max_decoded_bytes
        self.query_num, self.patch = config.query_num, config.patch_size
        self._newline = tokenizer.encode("\n")

    # ---- public API -------------------------------------------------------------------------------------------
    def __call__(self, messages: str | Sequence[dict], images: Sequence[Any] | None = None,
                 videos: Sequence[Any] | None = None, *, thinking: bool | None = False,
                 max_slice_nums: int | None = None, use_image_id: bool | None = None,
                 add_generation_prompt: bool = True, max_length: int | None = None, reserve: int = 0,
                 **knobs) -> dict[str, Any]:
        """One sample: input_ids / attention_mask [1, T], pixel_values [[views]], temporal_ids [[packages]],
        image_bound [LongTensor[n, 2]], count (its TokenCount), and labels [1, T] when the conversation ends with an assistant turn and
        add_generation_prompt is False. `knobs` (fps, max_frames, packing, max_visual_tokens) fill every video item
        that does not set its own; `max_length` - `reserve` bounds the prompt (ContextLengthError)."""
        planned, ids, bounds, masked = self._build(messages, images, videos, thinking, max_slice_nums, use_image_id,
                                                   add_generation_prompt, max_length, reserve, knobs, decode=True)
        views, packages = [], []
        for p in planned:
            v, pk = self._views(p)
            views += v
            packages += pk
        T = len(ids)
        out = {"input_ids": torch.tensor([ids], dtype=torch.long),
               "attention_mask": torch.ones(1, T, dtype=torch.long),
               "pixel_values": [views], "temporal_ids": [packages],
               "image_bound": [torch.tensor(bounds, dtype=torch.long).reshape(-1, 2)],
               "count": self._count(planned, ids, bounds, masked)}
        if not add_generation_prompt and self._last_role(messages) == "assistant":
            labels = chat.build_labels(ids, self.tokenizer)
            for s, e in masked:
                labels[s:e] = [chat.IGNORE_INDEX] * (e - s)
            out["labels"] = torch.tensor([labels], dtype=torch.long)
        return out

    def count_tokens(self, messages: str | Sequence[dict], images: Sequence[Any] | None = None,
                     videos: Sequence[Any] | None = None, *, thinking: bool | None = False,
                     max_slice_nums: int | None = None, use_image_id: bool | None = None,
                     add_generation_prompt: bool = True, max_length: int | None = None, reserve: int = 0,
                     **knobs) -> TokenCount:
        """What `__call__` would produce, in tokens, from image headers and video probes only."""
        return self._count(*self._build(messages, images, videos, thinking, max_slice_nums, use_image_id,
                                        add_generation_prompt, max_length, reserve, knobs, decode=False))

    def _count(self, planned: list[_Planned], ids: list[int], bounds: list, masked: list) -> TokenCount:
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
    @staticmethod
    def _last_role(messages) -> str:
        return "user" if isinstance(messages, str) else messages[-1]["role"]

    def _collect(self, messages, images, videos, knobs: dict) -> tuple[list[dict], list[_Visual]]:
        """Messages -> plain-text messages with markers, plus the visuals in marker order."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a str or a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m or set(m) - _MESSAGE_KEYS:
                got = sorted(m) if isinstance(m, dict) else type(m).__name__
                raise ValueError(f"message {i} must be a dict with 'role', 'content' and optionally "
                                 f"'reasoning_content' (got {got})")
            if not isinstance(m["content"], (str, list, tuple)):
                raise ValueError(f"message {i}: content must be a str or a list, got {type(m['content']).__name__}")
        for name, given in (("images", images), ("videos", videos)):
            if given is not None and not isinstance(given, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {type(given).__name__}")
        queues = {"image": list(images or []), "video": list(videos or [])}
        self._given = {k: len(q) for k, q in queues.items()}
        messages = self._place_unmarked_images(list(messages), queues["image"])
        visuals, out = [], []
        for i, m in enumerate(messages):
            items = [m["content"]] if isinstance(m["content"], str) else m["content"]
            parts = [self._item(it, f"message {i} item {j}", queues, visuals, knobs) for j, it in enumerate(items)]
            text = "\n".join(parts)
            if self.config.text_first and m["role"] == "user":
                text = _text_first(text)
            out.append({**m, "content": text})
        for kind, marker in (("image", IMAGE_MARKER), ("video", VIDEO_MARKER)):
            if queues[kind]:
                raise ValueError(f"{self._given[kind]} {kind}s were given but the messages hold only "
                                 f"{self._given[kind] - len(queues[kind])} {marker} markers")
        return out, visuals

    @staticmethod
    def _place_unmarked_images(messages: list[dict], images: list) -> list[dict]:
        """`images=` with no marker anywhere go in front of the last user message (as the release's `chat()`)."""
        texts = [it if isinstance(it, str) else it.get("text", "") if isinstance(it, dict) else ""
                 for m in messages for it in ([m["content"]] if isinstance(m["content"], str) else m["content"])]
        if not images or any(IMAGE_MARKER in t for t in texts if isinstance(t, str)):
            return messages
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError("images were given but there is no user message to put them in")
        m = messages[users[-1]]
        content = [m["content"]] if isinstance(m["content"], str) else list(m["content"])
        messages[users[-1]] = {**m, "content": [IMAGE_MARKER] * len(images) + content}
        return messages

    def _item(self, it: Any, where: str, queues: dict, visuals: list[_Visual], knobs: dict) -> str:
        if isinstance(it, str):
            for marker in _MARKERS.findall(it):
                kind = "image" if marker == IMAGE_MARKER else "video"
                if not queues[kind]:
                    raise ValueError(f"{where}: more {marker} markers than the {self._given[kind]} {kind}s given")
                src = queues[kind].pop(0)
                if kind == "image":
                    visuals.append(_Visual("image", src, where))
                else:
                    visuals.append(self._video(src if isinstance(src, dict) else {"video": src}, where, knobs))
            return it
        if isinstance(it, Image.Image):
            visuals.append(_Visual("image", it, where))
            return IMAGE_MARKER
        kind = it.get("type") if isinstance(it, dict) else None
        if not isinstance(kind, str) or kind not in _PART_KEYS:
            raise ValueError(f"{where}: unsupported content item of type {type(it).__name__} (expected a str, a PIL image or "
                             f"{{'type': 'text' | 'image' | 'video', ...}})")
        unknown = set(it) - _PART_KEYS[kind]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} on a {kind} item (allowed: "
                             f"{sorted(_PART_KEYS[kind])})")
        if kind == "text":
            if not isinstance(it.get("text"), str):
                raise ValueError(f"{where}: a text item needs 'text' (a str)")
            if _MARKERS.search(it["text"]):
                raise ValueError(f"{where}: a text item may not hold media markers; use image/video items")
            return it["text"]
        if kind == "image":
            if "image" not in it:
                raise ValueError(f"{where}: an image item needs 'image' (a path, bytes, PIL image or uint8 array)")
            visuals.append(_Visual("image", it["image"], where))
            return IMAGE_MARKER
        visuals.append(self._video({k: v for k, v in it.items() if k != "type"}, where, knobs))
        return VIDEO_MARKER

    @staticmethod
    def _video(item: dict, where: str, knobs: dict) -> _Visual:
        """A video item {'video': src | 'frames': [...], knobs...}; call-level knobs fill the unset ones."""
        unknown = set(item) - _PART_KEYS["video"]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} on a video (allowed: "
                             f"{sorted(_PART_KEYS['video'] - {'type'})})")
        if ("video" in item) == ("frames" in item):
            raise ValueError(f"{where}: a video needs exactly one of 'video' (a file) or 'frames' (+ 'packages')")
        if ("frames" in item) != ("packages" in item):
            raise ValueError(f"{where}: 'frames' (decoded images) and 'packages' (their temporal ids) go together")
        opts = {k: v for k, v in item.items() if k not in ("video", "frames")}
        if "video" in item and not hasattr(item["video"], "plan"):  # knobs apply to files, not decoded clips
            opts = {**{k: v for k, v in knobs.items() if v is not None}, **opts}
        elif any(k in opts for k in VIDEO_KNOBS):
            raise ValueError(f"{where}: {sorted(set(opts) & set(VIDEO_KNOBS))} only apply to video files; decoded "
                             f"frames keep their own packages")
        return _Visual("video", item.get("video", item.get("frames")), where, opts)

    # ---- planning (headers and probes only) --------------------------------------------------------------------
    def _plan_image(self, v: _Visual, max_slice_nums: int, use_image_id: bool) -> _Planned:
        size = image_size(v.src, f"{v.where}: {describe(v.src)}")
        layout = image_layout(size, self.config.scale_resolution, max_slice_nums, self.patch)
        return _Planned(v, layout, [[-1]], use_image_id, pixels=size[0] * size[1])

    def _plan_video(self, v: _Visual, call_slices: int | None, call_use_id: bool | None) -> _Planned:
        # item setting > explicit call setting (applied to every image and frame, as released) > README video default
        slices = _positive_int(v.opts.get("max_slice_nums", 1 if call_slices is None else call_slices),
                               f"{v.where}: max_slice_nums")
        use_id = _flag(v.opts.get("use_image_id", False if call_use_id is None else call_use_id),
                       f"{v.where}: use_image_id")
        if "packages" in v.opts:
            return self._plan_frames(v, slices, use_id)
        if hasattr(v.src, "frames") and hasattr(v.src, "plan"):  # a VideoClip decoded by the caller
            clip = v.src
            return self._planned_video(v, self._layout(clip.frames[0].size, slices), clip.plan, use_id, clip.frames)
        knobs = {k: v.opts.get(k) for k in VIDEO_KNOBS}
        try:
            vid.check_knobs(**knobs, query_num=self.query_num)
        except ValueError as e:
            raise ValueError(f"{v.where}: {e}") from None
        video = vid.open_video(v.src)  # closed by _build, after decoding (or right after planning)
        try:
            info = video.info
            layout = self._layout((info.width, info.height), slices)
            if knobs["max_visual_tokens"] is not None:
                per_package = layout.n_views * self.query_num
                if knobs["max_visual_tokens"] < per_package:
                    raise ValueError(f"{v.where}: max_visual_tokens={knobs['max_visual_tokens']} cannot hold one "
                                     f"package ({layout.n_views} views x {self.query_num} tokens)")
                knobs["max_visual_tokens"] //= layout.n_views  # the video planner counts one view per frame
            plan = video.plan(query_num=self.query_num, **knobs)
        except BaseException:
            video.close()
            raise
        p = self._planned_video(v, layout, plan, use_id, pixels=info.width * info.height * len(plan.frame_indices))
        p.file = video
        return p

    def _planned_video(self, v, layout, plan, use_id, frames=None, pixels: int = 0) -> _Planned:
        times = dict(zip(plan.temporal_ids, plan.timestamps))
        spans = [(times[p[0]], times[p[-1]]) for p in plan.packages]
        return _Planned(v, layout, [list(p) for p in plan.packages], use_id, frames, plan, spans, pixels)

    def _plan_frames(self, v: _Visual, slices: int, use_id: bool) -> _Planned:
        frames, packages = v.src, v.opts["packages"]
        if not isinstance(frames, list) or not frames or not isinstance(packages, list):
            raise ValueError(f"{v.where}: 'frames' must be a non-empty list of images and 'packages' a list of "
                             f"temporal-id lists")
        if any(not isinstance(p, list) or not p or any(not isinstance(t, int) or isinstance(t, bool) or
                                                           not 0 <= t < MAX_TEMPORAL_ID for t in p) for p in packages):
            raise ValueError(f"{v.where}: packages must be non-empty lists of temporal ids in [0, {MAX_TEMPORAL_ID}) "
                             f"(0.1 s units)")
        if sum(len(p) for p in packages) != len(frames):
            raise ValueError(f"{v.where}: packages hold {sum(len(p) for p in packages)} frames but "
                             f"{len(frames)} frames were given")
        if max(len(p) for p in packages) > vid.MAX_PACKING:
            raise ValueError(f"{v.where}: a package holds {max(len(p) for p in packages)} frames; a package takes at "
                             f"most {vid.MAX_PACKING} (the paper's limit)")
        frames = [load_image(f, f"{v.where} frame {k}") for k, f in enumerate(frames)]
        if len({f.size for f in frames}) > 1:
            raise ValueError(f"{v.where}: frames of one video must share one size, got "
                             f"{sorted({f.size for f in frames})}")
        layout = self._layout(frames[0].size, slices)
        spans = [(p[0] / 10, p[-1] / 10) for p in packages]  # ids are 0.1 s units
        return _Planned(v, layout, [list(p) for p in packages], use_id, frames, None, spans)

    def _layout(self, size: tuple[int, int], slices: int) -> ImageLayout:
        return image_layout(size, self.config.scale_resolution, slices, self.patch)

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
        frames = p.frames if p.frames is not None else self._decode_video(p)
        per_frame = [[normalize(x) for x in view_images(f, p.layout)] for f in frames]
        views, packages, k = [], [], 0
        for pk in p.packages:
            group = per_frame[k:k + len(pk)]
            k += len(pk)
            for s in range(p.layout.n_views):
                views += [fv[s] for fv in group]
                packages.append(list(pk))
        return views, packages

    def _decode_video(self, p: _Planned) -> _Planned:
        """Decode a planned video file from its open container. The data may end before the header said (a
        truncated file): the video module then re-plans for the decodable prefix with a warning, and so do we."""
        clip = p.file.decode(p.plan)
        if clip.plan == p.plan:
            p.frames = clip.frames
            return p
        return self._planned_video(p.visual, p.layout, clip.plan, p.use_image_id, frames=clip.frames)

    # ---- text and ids -----------------------------------------------------------------------------------------
    def _build(self, messages, images, videos, thinking, max_slice_nums, use_image_id, add_generation_prompt,
               max_length, reserve, knobs, decode: bool):
        unknown = set(knobs) - set(VIDEO_KNOBS)
        if unknown:
            raise TypeError(f"unknown argument(s) {sorted(unknown)}; video knobs are {VIDEO_KNOBS}")
        slices = self.config.max_slice_nums if max_slice_nums is None else _positive_int(max_slice_nums,
                                                                                          "max_slice_nums")
        use_id = self.config.use_image_id if use_image_id is None else _flag(use_image_id, "use_image_id")
        msgs, visuals = self._collect(messages, images, videos, knobs)
        chunks = _split_markers(chat.render_pieces(msgs, add_generation_prompt=add_generation_prompt,
                                                   thinking=thinking))
        if len(chunks) - 1 != len(visuals):
            raise ValueError(f"the rendered prompt keeps {len(chunks) - 1} of {len(visuals)} images/videos: a marker "
                             f"inside an earlier assistant turn's reasoning is dropped by the chat template")
        planned = []
        try:
            for v in visuals:
                planned.append(self._plan_image(v, slices, use_id) if v.kind == "image"
                               else self._plan_video(v, max_slice_nums, use_image_id))
            return self._layout_ids(planned, chunks, max_length, reserve, decode)
        finally:
            for p in planned:
                if p.file is not None:
                    p.file.close()

    def _layout_ids(self, planned: list[_Planned], chunks: list[str], max_length, reserve, decode: bool):
        """Checks (pixels, length) from the plans, then decodes videos (`decode`) and returns the ids."""
        decoded = sum(p.pixels for p in planned) * vid.BYTES_PER_PIXEL  # from the headers, before any decoding
        if decoded > self.max_decoded_bytes:
            raise ValueError(f"the images and video frames of this prompt would take {decoded / 2**30:.1f} GiB "
                             f"decoded, more than the limit of {self.max_decoded_bytes / 2**30:.1f} GiB "
                             f"(Processor.max_decoded_bytes); use fewer frames (fps / max_frames) or smaller media")
        ids, bounds, masked = self._ids(chunks, planned, max_length, reserve)
        if decode and any(p.plan is not None and p.frames is None for p in planned):
            planned = [self._decode_video(p) if p.plan is not None and p.frames is None else p for p in planned]
            ids, bounds, masked = self._ids(chunks, planned, max_length, reserve)  # a truncated file: fewer frames
        return planned, ids, bounds, masked

    def _ids(self, chunks: list[str], planned: list[_Planned], max_length: int | None, reserve: int):
        """Token ids with each visual's placeholder between the text chunks; its `<unk>` spans and [start, end)."""
        if max_length is not None:  # an absurd text is refused by its length, before it is encoded
            text_bytes = sum(len(text.encode("utf-8", "replace")) for c in chunks for text, control in c if not control)
            at_least = text_bytes // (3 * self.tokenizer.max_piece_bytes)
            if at_least > max_length:  # the text alone cannot fit (the exact count below handles the reserve)
                raise ContextLengthError(at_least, max_length, reserve, at_least=True)
        ids, bounds, masked, next_id = self._encode(chunks[0]), [], [], 0
        for p, chunk in zip(planned, chunks[1:]):
            start = len(ids)
            for k in range(len(p.packages)):
                if k:
                    ids += self._newline
                ids += self._placeholder(p.layout.grid, next_id if p.use_image_id else None, len(ids), bounds)
                next_id += p.use_image_id
            masked.append((start, len(ids)))
            ids += self._encode(chunk)
        if max_length is not None and len(ids) > max_length - reserve:
            raise ContextLengthError(len(ids), max_length, reserve)
        return ids, bounds, masked

    def _encode(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """The template's control tokens as tokens; all other text (message text included) through encode_text,
        where `<|im_start|>`, `<think>`, `<unk>`, ... are only characters (docs/reliability.md, "Control tokens")."""
        t = self.tokenizer
        return [i for text, control in pieces for i in ([t.token_to_id(text)] if control else t.encode_text(text))]

    def _placeholder(self, grid: tuple[int, int] | None, image_id: int | None, offset: int,
                     bounds: list) -> list[int]:
        """The ids of `image.image_placeholder(grid, query_num, image_id)`; each `<unk>` run's [start, end) is
        appended to `bounds` (positions from `offset`)."""
        t, Q = self.tokenizer, self.query_num
        ids = [] if image_id is None else [t.image_id_start_id, *t.encode(str(image_id)), t.image_id_end_id]

        def block(open_id: int, close_id: int) -> None:
            ids.append(open_id)
            bounds.append((offset + len(ids), offset + len(ids) + Q))
            ids.extend([t.unk_id] * Q)
            ids.append(close_id)

        block(t.image_start_id, t.image_end_id)
        cols, rows = grid or (0, 0)
        for r in range(rows):
            if r:
                ids.extend(self._newline)
            for _ in range(cols):
                block(t.slice_start_id, t.slice_end_id)
        return ids


def _text_first(text: str) -> str:
    """A user turn's text before its media markers (config.text_first): "<image>\nRead this." -> "Read this.\n<image>"."""
    pieces = _MARKERS.split(text)
    if len(pieces) == 1:
        return text
    words = [p.strip("\n") for p in pieces if p.strip("\n")]
    return "\n".join(words + _MARKERS.findall(text))


def _split_markers(pieces: list[tuple[str, bool]]) -> list[list[tuple[str, bool]]]:
    """Rendered (piece, is_control) pairs -> the runs between media markers (markers sit in text pieces only)."""
    chunks: list[list[tuple[str, bool]]] = [[]]
    for text, control in pieces:
        for k, part in enumerate([text] if control else _MARKERS.split(text)):
            if k:
                chunks.append([])
            if part:
                chunks[-1].append((part, control))
    return chunks


def _flag(x: Any, name: str) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be true or false, got {x!r}")
    return x


def _positive_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be an int >= 1, got {x!r}")
    return x


def collate(samples: Sequence[dict], pad_id: int, padding_side: str = "left") -> dict[str, Any]:
    """Batch processor outputs: pad input_ids with `pad_id`, attention_mask with 0, labels with IGNORE_INDEX, and
    shift each sample's image_bound by its left padding. Left padding for generation, right for training."""
    assert padding_side in ("left", "right") and samples, (padding_side, len(samples))
    assert len({"labels" in s for s in samples}) == 1, "some samples have labels and some do not"
    T = max(s["input_ids"].shape[1] for s in samples)
    out = {"input_ids": [], "attention_mask": [], "labels": [], "pixel_values": [], "temporal_ids": [],
           "image_bound": []}
    for s in samples:
        n = s["input_ids"].shape[1]
        left = T - n if padding_side == "left" else 0
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
