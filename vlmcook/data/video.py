"""Video input: open a file once, read its headers, plan which frames to sample, decode only those.

`open_video(src)` reads the headers (`VideoFile.info`); `.plan(...)` picks the frames and groups them into
*packages* (consecutive frames the 3D resampler compresses into one set of `query_num` tokens, docs/reference.md
5.4, 7); `.decode(plan)` decodes them from the same container. `probe_video`, `plan_frames` and `load_video` are
one-call wrappers.

- Sampling is the released rule (docs/reference.md 7.1): frame j at index int(j*gap + gap/2) with gap = N / n, 5 fps
  by default, <= 180 packages; temporal id = the frame's nearest 0.1 s step. The corner cases where we deviate on
  purpose (docs/reference.md 10.15) are listed in `plan_frames`.
- Frame j is the one on screen at its timestamp (index / fps after the first frame), as a player shows it, and comes
  back upright: a display-matrix rotation (phone videos) is applied, as EXIF orientation is for still images.
- Limits: `MAX_FRAME_PIXELS` per frame (refused from the header), `MAX_VIDEO_FRAMES` per video, and
  `decoded_bytes(info, plan)` for the caller's memory budget (`MAX_DECODED_BYTES` by default).
- How frames are found (keyframe-aware seeking) and damaged files: `VideoFile.decode`; costs in
  benchmarks/bench_video.py.
"""
from __future__ import annotations

import bisect
import io
import itertools
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

MAX_NUM_PACKAGES = 180  # released MAX_NUM_FRAMES: packages (resampler outputs) per video
MAX_AUTO_PACKING = 3    # released MAX_NUM_PACKING: largest packing chosen automatically
MAX_PACKING = 6         # documented valid range of an explicit packing
MAX_VIDEO_FRAMES = MAX_NUM_PACKAGES * MAX_PACKING  # 1080: no plan samples more frames than this
# 8K UHD, the largest size phones and cameras record. Checked from the header before anything is decoded; the model
# sees ~448 px per side at the video default (max_slice_nums=1), so larger frames only cost memory.
MAX_FRAME_PIXELS = 7680 * 4320
# Default budget for the frames decoded for one request (see decoded_bytes): 2 GiB holds the released automatic cap
# of 540 frames at 1280x720 (1.99 GB) or 64 frames of 3840x2160 (2.12 GB), not 64 frames of 4096x4096 (4.3 GB).
MAX_DECODED_BYTES = 2**31
BYTES_PER_PIXEL = 4     # a decoded frame is a PIL RGB image, which Pillow stores as 4 bytes per pixel (RGBX)
DEFAULT_FPS = 5.0
MAX_FPS = 10.0          # model card: "up to 10 fps"
STEPS_PER_SECOND = 10   # temporal id unit: 0.1 s
METHODS = ("auto", "seek", "sequential")


class VideoError(ValueError):
    """A video that cannot be used; the message names the source and what was wrong."""


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds, n_frames / fps (as the released demo computes it)
    fps: float
    n_frames: int
    width: int  # of the upright frame (after `rotation`)
    height: int
    source: str  # path or "<N bytes>", for error messages
    start_time: float = 0.0  # stream time of the first frame, seconds
    counted: bool = False  # True when n_frames came from a counting pass (header had no frame count)
    rotation: int = 0  # degrees counter-clockwise (0/90/180/270) that turn the stored frames upright


@dataclass(frozen=True)
class FramePlan:
    frame_indices: list[int]
    timestamps: list[float]  # seconds from the first frame
    temporal_ids: list[int]  # 0.1 s units, strictly increasing
    packages: list[list[int]]  # temporal ids in consecutive groups of `packing` (last may be shorter)
    packing: int = 1
    # the plan_frames arguments, so decoding can re-plan for a truncated file with the same settings
    knobs: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class VideoClip:
    frames: list[Image.Image]
    plan: FramePlan
    info: VideoInfo


def decoded_bytes(info: VideoInfo, plan: FramePlan) -> int:
    """Memory the decoded frames of `plan` will hold (PIL RGB at native size), from the headers alone: the number to
    compare with a budget such as MAX_DECODED_BYTES before calling `decode`."""
    return len(plan.frame_indices) * info.width * info.height * BYTES_PER_PIXEL


# ----------------------------------------------------------------------------------------------------------------
# planning (pure)

def check_knobs(fps, max_frames, packing, max_visual_tokens, query_num) -> None:
    """The sampling knobs' types and ranges (None = the default), checked before any file is touched."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def integer(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if fps is not None and not (number(fps) and 0 < fps <= MAX_FPS):
        raise ValueError(f"fps must be a number in (0, {MAX_FPS:g}] frames per second, got {fps!r}")
    if max_frames is not None and not (integer(max_frames) and max_frames >= 1):
        raise ValueError(f"max_frames must be an integer >= 1, got {max_frames!r}")
    if packing is not None and not (integer(packing) and 1 <= packing <= MAX_PACKING):
        raise ValueError(f"packing must be an integer in 1..{MAX_PACKING}, got {packing!r}")
    if not (integer(query_num) and query_num >= 1):
        raise ValueError(f"query_num must be an integer >= 1, got {query_num!r}")
    if max_visual_tokens is not None and not (integer(max_visual_tokens) and max_visual_tokens >= query_num):
        raise ValueError(f"max_visual_tokens must be an integer of at least one package ({query_num} tokens), got "
                         f"{max_visual_tokens!r}")


def temporal_id(index: int, fps: float) -> int:
    """Nearest 0.1 s step of frame `index`'s time index / fps, halves rounded up. Computed as index*10/fps, not
    (index/fps)/0.1, so that exact halves stay exact (9/60 s / 0.1 = 1.4999999999999998)."""
    return math.floor(index * STEPS_PER_SECOND / fps + 0.5)


def _next_free_frame(index: int, min_id: int, fps: float) -> int:
    """First frame at or after `index` whose temporal id is >= min_id."""
    index = max(index, math.ceil((min_id - 0.5) * fps / STEPS_PER_SECOND) - 1)
    while temporal_id(index, fps) < min_id:
        index += 1
    return index


def _frame_count_and_packing(info: VideoInfo, fps, max_frames, packing, max_packages) -> tuple[int, int]:
    duration = info.n_frames / info.fps
    # Python round (half to even) on purpose: the demo's round(), so parity vectors reproduce exactly.
    n = round(min(DEFAULT_FPS if fps is None else fps, info.fps) * duration)
    n = max(1, min(n, info.n_frames, max_frames or info.n_frames))
    if packing is not None:
        return min(n, max_packages * packing), packing
    p = max(1, math.ceil(n / max_packages))
    if p > MAX_AUTO_PACKING:  # too long even at the largest automatic packing: lower the effective fps
        return max_packages * MAX_AUTO_PACKING, MAX_AUTO_PACKING
    return n, p


def plan_frames(info: VideoInfo, fps: float | None = None, max_frames: int | None = None,
                packing: int | None = None, max_visual_tokens: int | None = None, query_num: int = 64) -> FramePlan:
    """Which frames to sample and how to package them (pure). The released rule (module docstring), with these
    deliberate deviations (docs/reference.md 10.15), each visible only in corner cases:
    - Temporal id = round(t / 0.1) (half up), the true nearest 0.1 s step of the frame's time t. The demo snaps to
      the grid then truncates with int32, so some ids come out one too low (4.3 s -> 42, not 43) and can collide.
      Ours never repeat: when the index rule puts two samples in one 0.1 s step (index jitter near 10 fps sampling,
      e.g. of 25 fps video), the later sample moves forward to the first frame of the next step; a sample is
      dropped only if that runs past the last frame. A frame in the last 0.05 s gets round(T / 0.1) (the demo
      clamps to its grid arange(0, T, 0.1)).
    - Packing is chosen from the frame count actually sampled (smallest p <= 3 with ceil(n/p) <= 180), so the
      package cap always holds; the demo tests `fps * int(T) <= 180` and can emit 182 packages (36.5 s at 5 fps).
    - Never more frames than the video has (the demo's round(fps)*T can exceed N under 10 fps), at least 1.
    - An explicit `packing` may be 1..6 and is not clamped to 3; the frame count is then capped at 180 * packing
      (the demo's force_packing=1 can give 540 packages). So a plan never has more than MAX_VIDEO_FRAMES frames.
    - `max_visual_tokens`: the package cap becomes min(180, budget // query_num); packing grows first (<= 3, or the
      given packing), then the frame count (effective fps) shrinks, so packages * query_num <= budget always.
    Durations follow the demo: T = n_frames / fps from the headers (fps = the stream's average rate)."""
    knobs = dict(fps=fps, max_frames=max_frames, packing=packing, max_visual_tokens=max_visual_tokens,
                 query_num=query_num)
    check_knobs(**knobs)
    if info.n_frames < 1 or not info.fps > 0:
        raise VideoError(f"{info.source}: cannot sample from {info.n_frames} frames at {info.fps} fps")
    max_packages = MAX_NUM_PACKAGES
    if max_visual_tokens is not None:
        max_packages = min(MAX_NUM_PACKAGES, max_visual_tokens // query_num)
    n, p = _frame_count_and_packing(info, fps, max_frames, packing, max_packages)
    assert n <= MAX_VIDEO_FRAMES, (n, p)  # packages <= 180 and packing <= 6
    gap = info.n_frames / n
    indices, ids = [], []
    for j in range(n):
        idx = int(j * gap + gap / 2)  # the released index rule
        if ids and temporal_id(idx, info.fps) <= ids[-1]:
            # Index jitter put two samples in one 0.1 s step (happens near 10 fps sampling): move this one to the
            # first frame of the next step, so ids stay unique and exact. The released rule keeps both frames
            # and emits a duplicate id.
            idx = _next_free_frame(idx, ids[-1] + 1, info.fps)
            if idx >= info.n_frames:
                break
        indices.append(idx)
        ids.append(temporal_id(idx, info.fps))
    stamps = [i / info.fps for i in indices]
    packages = [ids[i:i + p] for i in range(0, len(ids), p)]
    return FramePlan(frame_indices=indices, timestamps=stamps, temporal_ids=ids, packages=packages, packing=p,
                     knobs=knobs)


# ----------------------------------------------------------------------------------------------------------------
# opening

def _import_av():
    try:
        import av
    except ImportError as e:  # the video extra is optional
        raise ImportError("video input needs PyAV: pip install 'vlmcook[video]' (or pip install av)") from e
    return av


def _checked_source(src) -> tuple[bytes | str, str]:
    """(what av.open reads, a name for messages); a missing, empty or odd source is refused before PyAV sees it."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        name = f"<{len(src)} bytes of video>"
        if len(src) == 0:
            raise VideoError(f"{name}: empty input")
        return bytes(src), name
    if not isinstance(src, (str, Path)):
        raise TypeError(f"video source must be a path or bytes, got {type(src).__name__}")
    path, name = Path(src), str(src)
    if not path.exists():
        raise VideoError(f"{name}: no such file")
    if not path.is_file():
        raise VideoError(f"{name}: not a regular file")
    if path.stat().st_size == 0:
        raise VideoError(f"{name}: empty file")
    return str(path), name


def _open_container(target: bytes | str, name: str):
    av = _import_av()
    try:
        return av.open(io.BytesIO(target) if isinstance(target, bytes) else target, mode="r")
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{name}: not a readable video container (corrupt, truncated or unsupported "
                         f"format): {e}") from e


def open_video(src: str | Path | bytes) -> VideoFile:
    """Open a video file or its bytes once and read its headers. Use as a context manager (or call `close`)."""
    target, name = _checked_source(src)
    return VideoFile(_open_container(target, name), target, name)


def probe_video(src: str | Path | bytes) -> VideoInfo:
    """Duration, fps, frame count and upright size from the headers (see `VideoFile`)."""
    with open_video(src) as video:
        return video.info


def load_video(src: str | Path | bytes, fps: float | None = None, max_frames: int | None = None,
               packing: int | None = None, max_visual_tokens: int | None = None, query_num: int = 64,
               method: str = "auto") -> VideoClip:
    """Sample and decode a video into upright RGB frames at native resolution plus its FramePlan (one open)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    knobs = dict(fps=fps, max_frames=max_frames, packing=packing, max_visual_tokens=max_visual_tokens,
                 query_num=query_num)
    check_knobs(**knobs)  # fail on bad knobs before touching the file
    with open_video(src) as video:
        return video.decode(video.plan(**knobs), method)


# ----------------------------------------------------------------------------------------------------------------
# the opened file

_UPRIGHT = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


class VideoFile:
    """One opened video: `info` read once from the headers, frames decoded from the same container.

    Probing reads the stream header (frame rate, size, frame count), refuses frames over MAX_FRAME_PIXELS, then
    decodes the first frame for its display-matrix rotation (PyAV exposes the matrix on decoded frames only). A
    header without a frame count (mkv, webm, ts) is completed by a demux-only counting pass, which also lists the
    keyframes for `decode`. Not thread-safe: one request at a time."""

    def __init__(self, container, target: bytes | str, name: str):
        self._container, self._target, self.name = container, target, name
        self._keys: list[float] | None = None  # keyframe times in seconds, from a demux-only pass
        self._can_seek = True  # False once a seek landed after its target (imprecise seeking, e.g. MPEG-TS)
        try:
            self.info = self._probe()
        except BaseException:
            container.close()
            raise

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def plan(self, fps: float | None = None, max_frames: int | None = None, packing: int | None = None,
             max_visual_tokens: int | None = None, query_num: int = 64) -> FramePlan:
        """`plan_frames(self.info, ...)`: pure, reads nothing."""
        return plan_frames(self.info, fps, max_frames, packing, max_visual_tokens, query_num)

    def decode(self, plan: FramePlan, method: str = "auto") -> VideoClip:
        """Decode `plan`'s frames: upright RGB PIL images at native resolution, each the frame on screen at its
        timestamp (the last frame starting by it, plus a quarter frame for pts rounding).

        `method='auto'`: one demux-only pass lists the keyframe times (reads the file, decodes nothing), then one
        forward pass decodes the planned frames, seeking exactly when a keyframe lies between the current frame and
        the next target. Per target it decodes no more frames than per-frame seeking ('seek') or one sequential
        pass ('sequential'), the two other methods (benchmarks). Memory: the sampled frames plus one decoder
        state, independent of the video's length. A seek that lands after its target (MPEG-TS seeks by byte
        position and lands a keyframe late) turns seeking off for this file: decoding restarts from the first
        frame and goes on sequentially, which is always correct.

        Damaged data: if the data ends or breaks before a planned frame, the decodable prefix is measured, the
        plan is recomputed with the same knobs for that shorter video and a warning names the source; nothing is
        padded, so each frame is the one its timestamp says. No decodable frame: VideoError."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if plan.frame_indices and plan.frame_indices[-1] >= self.info.n_frames:
            raise ValueError(f"{self.name}: the plan samples frame {plan.frame_indices[-1]} of a video with "
                             f"{self.info.n_frames} frames; make it with this file's plan()")
        info, frames = self.info, self._decode_frames(plan.timestamps, method)
        if len(frames) < len(plan.frame_indices):
            n_ok = self._decodable_frames()
            if n_ok == 0:
                raise VideoError(f"{self.name}: no decodable frames (header says {info.n_frames})")
            warnings.warn(f"{self.name}: video data ends after {n_ok} of {info.n_frames} frames (truncated or "
                          f"corrupt); sampling the first {n_ok / info.fps:.2f} s only", stacklevel=2)
            info = replace(info, n_frames=n_ok, duration=n_ok / info.fps)
            plan = plan_frames(info, **plan.knobs)
            frames = self._decode_frames(plan.timestamps, method)
            if len(frames) < len(plan.frame_indices):
                raise VideoError(f"{self.name}: decoded {len(frames)} of {len(plan.frame_indices)} planned frames "
                                 f"twice in a row; the file is damaged")
        return VideoClip(frames=frames, plan=plan, info=info)

    # ---- probing -------------------------------------------------------------------------------------------------
    def _probe(self) -> VideoInfo:
        av, name = _import_av(), self.name
        if not self._container.streams.video:
            kinds = ", ".join(s.type for s in self._container.streams) or "none"
            raise VideoError(f"{name}: no video stream (streams found: {kinds})")
        stream = self._stream = self._container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        if not rate > 0:
            raise VideoError(f"{name}: video stream has no frame rate in its header")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(f"{name}: video stream has no frame size ({width}x{height})")
        if width * height > MAX_FRAME_PIXELS:
            raise VideoError(f"{name}: frames of {width}x{height} = {width * height:,} pixels are more than the "
                             f"limit of {MAX_FRAME_PIXELS:,} (vlmcook.data.video.MAX_FRAME_PIXELS, 8K UHD)")
        rotation = self._rotation()
        n, counted = stream.frames, False
        length = float(stream.duration * stream.time_base) if stream.duration else 0.0  # seconds, if in the header
        if n <= 0:  # header without a frame count (mkv/webm/ts): counting pass
            self._rewind()
            try:
                n, self._keys, span = self._scan_packets()
            except av.FFmpegError as e:
                raise VideoError(f"{name}: cannot read video packets: {e}") from e
            counted, length = True, span * n / (n - 1) if n > 1 else 0.0
        # Variable frame rate: some headers (mkv, webm, ts, gif) estimate the average rate from the first frames
        # only, so screen and browser recordings would be sampled over part of their length. Trust the stream's
        # own length when the two disagree by more than timestamp rounding (5%); mp4/mov rates already agree.
        if n > 1 and length > 0 and abs(n / length / rate - 1) > 0.05:
            rate = n / length
        if n <= 0:
            raise VideoError(f"{name}: video stream has no frames")
        if rotation in (90, 270):
            width, height = height, width
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        return VideoInfo(duration=n / rate, fps=rate, n_frames=n, width=width, height=height,
                         source=name, start_time=start, counted=counted, rotation=rotation)

    def _rotation(self) -> int:
        """The first frame's display rotation, as counter-clockwise degrees in {0, 90, 180, 270} (0 if no frame
        decodes: `decode` reports that). ffmpeg's players rotate by the same rule."""
        av = _import_av()
        try:
            frame = next(self._container.decode(self._stream), None)
            degrees = 0 if frame is None else frame.rotation
        except (av.FFmpegError, ValueError):  # ValueError: PyAV's int() of a singular matrix's NaN angle
            return 0
        quarter = round(degrees / 90)
        if abs(degrees - 90 * quarter) > 2:  # PyAV truncates the matrix's angle to an int: allow a little
            raise VideoError(f"{self.name}: display rotation of {degrees} degrees is not a multiple of 90 "
                             f"(unsupported)")
        return 90 * quarter % 360

    def _scan_packets(self) -> tuple[int, list[float], float]:
        """Demux-only pass (reads packets, decodes nothing): frame count (one packet per frame for the codecs we
        meet; the final flush packet has size 0), the sorted keyframe times and last minus first frame time (s)."""
        stream, n, keys, times = self._stream, 0, [], []
        for packet in self._container.demux(stream):
            if packet.size > 0:
                n += 1
                if packet.pts is not None:
                    times.append(packet.pts)
                    if packet.is_keyframe:
                        keys.append(float(packet.pts * stream.time_base))
        span = float((max(times) - min(times)) * stream.time_base) if times else 0.0
        return n, sorted(keys), span

    # ---- decoding ------------------------------------------------------------------------------------------------
    def _rewind(self) -> None:
        """Back to the first packet (after a pass or a seek). Reopens the source only if seeking itself fails."""
        av = _import_av()
        try:
            self._container.seek(0)
        except av.FFmpegError:
            self._container.close()
            self._container = _open_container(self._target, self.name)
            self._stream = self._container.streams.video[0]

    def _keyframes(self) -> list[float]:
        if self._keys is None:
            self._rewind()
            try:
                self._keys = self._scan_packets()[1]
            except _import_av().FFmpegError:  # damaged data: no index, decode sequentially (still correct)
                self._keys = []
        return self._keys

    def _cursor(self, seek_to: float | None) -> _Cursor:
        """Frames from the keyframe before `seek_to` (stream seconds), or from the first frame if None."""
        if seek_to is not None:
            try:  # round, not int: a float hair below a keyframe's pts would land one whole GOP earlier
                self._container.seek(round(seek_to / self._stream.time_base), stream=self._stream)
                return _Cursor(self._container.decode(self._stream), self.info.fps, seeked=True)
            except _import_av().FFmpegError:
                self._can_seek = False
        self._rewind()
        return _Cursor(self._container.decode(self._stream), self.info.fps, seeked=False)

    def _decode_frames(self, timestamps: list[float], method: str) -> list[Image.Image]:
        """The frames on screen at `timestamps` (seconds from the first frame) in one forward pass, fewer if the
        data ends or breaks. 'auto' seeks iff the last keyframe <= the target lies after the current frame."""
        keys = self._keyframes() if method == "auto" and self._can_seek else []
        start, eps = self.info.start_time, 0.25 / self.info.fps
        frames, cur = [], None
        for ts in (start + t for t in timestamps):
            if method == "seek":
                jump = self._can_seek
            else:
                k, pos = bisect.bisect_right(keys, ts + eps) - 1, start if cur is None or cur.pos is None else cur.pos
                jump = self._can_seek and k >= 0 and keys[k] > pos + eps
            if jump or cur is None:
                cur = self._cursor(ts if jump else None)
            frame = cur.frame_at(ts)
            if frame is None and cur.seeked and not cur.started:
                # the seek landed after ts or at the end (imprecise seeking): go on sequentially from frame 0
                self._can_seek = False
                cur = self._cursor(None)
                frame = cur.frame_at(ts)
            if frame is None:
                break
            frames.append(self._upright(frame))
        return frames

    def _decodable_frames(self) -> int:
        """Frames (in index / fps terms) up to the last one decodable from the start, until the data ends or
        breaks. Sequential, constant memory."""
        self._rewind()
        last = None
        try:
            for frame in self._container.decode(self._stream):
                last = frame.time if frame.time is not None else last
        except _import_av().FFmpegError:
            pass
        if last is None:
            return 0
        return min(self.info.n_frames, round((last - self.info.start_time) * self.info.fps) + 1)

    def _upright(self, frame) -> Image.Image:
        if frame.width * frame.height > self.info.width * self.info.height:  # keeps decoded_bytes a bound
            raise VideoError(f"{self.name}: a frame of {frame.width}x{frame.height} is larger than the header's "
                             f"{self.info.width}x{self.info.height} (size changes inside a stream are refused)")
        # reformat() then to_ndarray(): the same swscale conversion as to_ndarray(format=...) (identical pixels), which
        # in PyAV 18 costs 2-10x more per frame (0.79 vs 0.35 ms at 720p, 0.6 vs 0.06 ms at 196x98); to_image() ~8x.
        img = Image.fromarray(frame.reformat(format="rgb24").to_ndarray())
        return img.transpose(_UPRIGHT[self.info.rotation]) if self.info.rotation else img


class _Cursor:
    """Walks decoded frames forward and returns the one on screen at each of a series of increasing times."""

    def __init__(self, frames, fps: float, seeked: bool):
        self._frames, self.seeked = frames, seeked
        self._eps, self._frame_s = 0.25 / fps, 1.0 / fps
        self.pos = None  # time of the last decoded frame
        self._prev = self._ahead = None  # the last frame starting by the previous target; the first one after it

    def frame_at(self, ts: float):
        """Decode until a frame starts after ts and return the one before it (keeping the later one for the next
        call). At the end of the data, the last frame if it is still on screen at ts; None if none is."""
        found = None
        try:
            for frame in itertools.chain([self._ahead] if self._ahead is not None else [], self._frames):
                self._ahead, self.pos = None, (frame.time if frame.time is not None else self.pos)
                if self.pos is not None and self.pos > ts + self._eps:
                    found, self._ahead = self._prev, frame
                    break
                self._prev = frame
        except _import_av().FFmpegError:
            pass  # corrupt or truncated data: like the end of the stream
        prev = self._prev
        if found is None and self._ahead is None and prev is not None and prev.time is not None:
            found = prev if ts < prev.time + self._frame_s - self._eps else None  # end: last frame still shown
        return found

    @property
    def started(self) -> bool:
        """Whether a frame starting by a target has come out (False: the walk began after the target, or at the
        end of the data)."""
        return self._prev is not None
