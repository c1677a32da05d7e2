"""The one video writer of the tests and benchmarks (PyAV; import it as `from media import write_video`).

`vlmcook.data.synth_video.encode_mp4` stays the library's writer for synthetic data. This one also writes what
the video boundary must handle: other containers and codecs, set keyframe intervals, shifted or irregular
timestamps, display-matrix rotation, zero frames.
"""
from __future__ import annotations

import io
import itertools
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image


def write_video(dst: str | Path | None, frames: Iterable, fps: int, codec: str = "libx264",
                container: str | None = None, gop: int | None = None, pts: Iterable[int] | None = None,
                rotate: int = 0, options: dict | None = None, faststart: bool = False,
                size: tuple[int, int] | None = None) -> Path | bytes:
    """Encode `frames` (PIL images, uint8 [H, W, 3] RGB arrays or av.VideoFrames; any iterable, consumed once) at
    `fps` into `dst`, or return the bytes when `dst` is None (then `container` is needed, e.g. "mp4").

    - `container`: an FFmpeg format name ("mp4", "mov", "matroska", "webm", "avi", "mpegts", "gif"); default from
      the file suffix.
    - `gop`: keyframe interval in frames (for libx264 exactly that: no scene-cut keyframes).
    - `pts`: one time per frame in 1/fps units (shift the start, leave gaps, vary the rate); default 0, 1, 2, ...
    - `rotate`: display-matrix rotation, degrees counter-clockwise as PyAV and ffmpeg read it back.
    - `options`: encoder options; default {"crf": "18"} for libx264 (near-lossless), none for other codecs.
    - `faststart`: mp4/mov index before the data (else after it); `size`: (w, h), needed only with no frames.
    The pixel format is the codec's first (yuv420p for most, yuvj420p for mjpeg, rgb8 for gif)."""
    import av

    frames = iter(frames)
    first = next(frames, None)
    if first is not None:
        first = _as_frame(av, first)
        size = (first.width, first.height)
    buf = io.BytesIO() if dst is None else None
    out = av.open(buf if dst is None else str(dst), "w", format=container,
                  options={"movflags": "faststart"} if faststart else {})
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height = size
    formats = [f.name for f in av.codec.Codec(codec, "w").video_formats or []]
    stream.pix_fmt = formats[0] if formats else "yuv420p"
    stream.codec_context.time_base = Fraction(1, fps)
    opts = dict({"crf": "18"} if codec == "libx264" and options is None else options or {})
    if gop:
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            opts.update({"keyint": str(gop), "min-keyint": str(gop), "scenecut": "0"})
    stream.options = opts
    if rotate:
        stream.set_display_rotation(rotate)
    if first is None:
        out.start_encoding()  # a valid header with a video stream and no frame
    else:
        times = itertools.count() if pts is None else pts
        for t, frame in zip(times, itertools.chain([first], frames), strict=pts is not None):
            frame = _as_frame(av, frame)
            frame.pts, frame.time_base = t, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    out.close()
    return Path(dst) if dst is not None else buf.getvalue()


def _as_frame(av, frame):
    if isinstance(frame, av.VideoFrame):
        return frame
    if isinstance(frame, Image.Image):
        return av.VideoFrame.from_image(frame)
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
