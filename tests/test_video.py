"""Video sampling and decoding: parity vectors 9-11 (docs/reference.md 11), temporal ids against a brute-force
nearest-grid oracle, and decoding of small files written here (the containers and codecs people send) whose pixels
encode the frame index."""
import math
import warnings

import numpy as np
import pytest

from media import write_video
from vlmcook.data import video
from vlmcook.data.video import (MAX_NUM_PACKAGES, MAX_VIDEO_FRAMES, VideoError, VideoInfo, decoded_bytes, load_video,
                                open_video, plan_frames, probe_video)

try:  # PyAV is the optional 'video' extra: the planning tests run without it
    import av
except ImportError:
    av = None

W, H, N, FPS = 128, 64, 180, 30  # 6 s at 30 fps, the parity video of docs/reference.md 11 (small)


def _index_frame(i: int) -> np.ndarray:
    """Frame i as 8 vertical black/white stripes = the bits of i (robust to lossy coding)."""
    a = np.zeros((H, W, 3), np.uint8)
    for b in range(8):
        if (i >> b) & 1:
            a[:, b * 16:(b + 1) * 16] = 255
    return a


def _read_index(img) -> int:
    a = np.asarray(img.convert("L"), dtype=np.float32)
    return sum(1 << b for b in range(8) if a[8:-8, b * 16 + 4:b * 16 + 12].mean() > 127)


def _write(path, n=N, pts=None, fps=FPS, **kw):
    """Frame i shows index i; `pts` (in 1/fps units) shifts the start or leaves gaps (the frame at pts t shows t)."""
    times = range(n) if pts is None else pts
    return write_video(path, (_index_frame(i) for i in times), fps, pts=pts, **kw)


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    if av is None:
        pytest.skip("PyAV not installed (pip install 'vlmcook[video]')")
    d = tmp_path_factory.mktemp("videos")
    out = {
        "mp4": _write(d / "clip.mp4", gop=12, faststart=True),  # short GOP + B-frames: seeking matters
        "mpeg4": _write(d / "plain.mp4", codec="mpeg4"),  # moov atom at the end
        "mkv": _write(d / "clip.mkv"),  # no frame count in the header
        "offset": _write(d / "offset.mp4", gop=12, pts=range(30, 30 + N)),  # first frame at 1 s
        "gaps": _write(d / "gaps.mp4", gop=12, pts=[i for i in range(N) if not 90 <= i < 100]),  # dropped frames
        "empty": write_video(d / "empty.avi", [], FPS, codec="mpeg4", size=(W, H)),  # a video stream, 0 frames
    }
    c = av.open(str(d / "audio.wav"), "w")  # audio only
    s = c.add_stream("pcm_s16le", rate=8000)
    fr = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
    fr.sample_rate = 8000
    for p in list(s.encode(fr)) + list(s.encode()):
        c.mux(p)
    c.close()
    out["audio"] = d / "audio.wav"
    return out


SIX_S = VideoInfo(duration=6.0, fps=30.0, n_frames=180, width=1280, height=720, source="synthetic 6 s")


def _reference_ids(indices, fps, n_frames):
    """The released demo's ids (docs/reference.md 7.2), independently: snap to the nearest arange(0, T, 0.1) point, int32."""
    grid = np.arange(0, n_frames / fps, 0.1)
    t = np.asarray(indices) / fps
    return (grid[np.abs(t[:, None] - grid[None]).argmin(1)] / 0.1).astype(np.int32).tolist()


# ---------------------------------------------------------------------------------------------------------------- plan

def test_parity_vector_9_fps5():
    plan = plan_frames(SIX_S, fps=5)
    assert plan.frame_indices == list(range(3, 180, 6))
    assert plan.timestamps == pytest.approx([0.1 + 0.2 * j for j in range(30)])
    # Ours: the nearest 0.1 s step, so 4.3 s -> 43 (the released vector has 42 there, see next test).
    assert plan.temporal_ids == list(range(1, 60, 2))
    assert plan.packages == [[i] for i in range(1, 60, 2)] and plan.packing == 1
    assert len(plan.packages) * 64 == 1920


def test_temporal_id_rounding_differs_from_released_truncation():
    plan = plan_frames(SIX_S, fps=5)
    ref = _reference_ids(plan.frame_indices, 30.0, 180)
    spec_vector_9 = list(range(1, 42, 2)) + [42] + list(range(45, 60, 2))  # docs/reference.md 11.9 as printed
    assert ref == spec_vector_9  # the oracle reproduces the released quirk
    differ = [(t, r, o) for t, r, o in zip(plan.timestamps, ref, plan.temporal_ids) if r != o]
    assert [(round(t, 6), r, o) for t, r, o in differ] == [(4.3, 42, 43)]


def test_parity_vector_10_fps2():
    plan = plan_frames(SIX_S, fps=2)
    assert plan.frame_indices == list(range(7, 173, 15))
    assert plan.temporal_ids == list(range(2, 58, 5))
    assert plan.temporal_ids == _reference_ids(plan.frame_indices, 30.0, 180)
    assert len(plan.packages) * 64 == 768


def test_parity_vector_11_fps3_packing3():
    plan = plan_frames(SIX_S, fps=3, packing=3)
    assert len(plan.frame_indices) == 18
    assert plan.packages == [[2, 5, 8], [12, 15, 18], [22, 25, 28], [32, 35, 38], [42, 45, 48], [52, 55, 58]]
    assert len(plan.packages) * 64 == 384


def test_default_is_5_fps():
    assert plan_frames(SIX_S) == plan_frames(SIX_S, fps=5)


def _info(seconds, fps):
    n = max(1, round(seconds * fps))
    return VideoInfo(duration=n / fps, fps=fps, n_frames=n, width=64, height=48, source=f"{seconds}s@{fps}")


@pytest.mark.parametrize("fps", [7.5, 24000 / 1001, 25.0, 30000 / 1001, 60.0])
@pytest.mark.parametrize("seconds", [0.04, 1.0, 4.3, 36.5, 61.0, 600.0])
@pytest.mark.parametrize("knobs", [{}, {"fps": 10}, {"fps": 1}, {"fps": 10, "packing": 6},
                                   {"max_visual_tokens": 64 * 40}, {"max_frames": 7}])
def test_plan_invariants(fps, seconds, knobs):
    info = _info(seconds, fps)
    plan = plan_frames(info, **knobs)
    idx, ids = plan.frame_indices, plan.temporal_ids
    assert 1 <= len(idx) and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < info.n_frames
    assert plan.timestamps == [i / fps for i in idx]
    # Oracle: each id is a nearest point of a brute-force 0.1 s grid (exact halves, e.g. 1.85 s, may go either
    # way there; ours go up); ids strictly increasing (no duplicates).
    grid = np.arange(0, 7000) / 10
    dist = np.abs(np.asarray(plan.timestamps)[:, None] - grid[None])
    assert np.all(dist[np.arange(len(ids)), ids] <= dist.min(1) + 1e-9)
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert [i for p in plan.packages for i in p] == ids
    assert all(len(p) == plan.packing for p in plan.packages[:-1]) and 1 <= len(plan.packages[-1]) <= plan.packing
    assert len(plan.packages) <= MAX_NUM_PACKAGES
    assert len(plan.packages) * 64 <= knobs.get("max_visual_tokens", math.inf)
    assert len(idx) <= knobs.get("max_frames", math.inf)
    assert len(idx) <= MAX_VIDEO_FRAMES
    assert plan.packing == knobs.get("packing", plan.packing) and 1 <= plan.packing <= 6


@pytest.mark.parametrize("fps", [25.0, 24000 / 1001, 60.0, 30000 / 1001])
def test_10fps_sampling_keeps_every_frame_with_unique_exact_ids(fps):
    info = _info(61, fps)
    plan = plan_frames(info, fps=10, packing=6)
    assert len(plan.frame_indices) == 610
    released = [int(j * info.n_frames / 610 + info.n_frames / 1220) for j in range(610)]
    ref_ids = _reference_ids(released, fps, info.n_frames)
    assert len(set(ref_ids)) < 610  # the released ids do collide here ...
    assert len(set(plan.temporal_ids)) == 610  # ... ours do not
    # samples move forward by less than one 0.1 s step
    assert all(0 <= b - a <= math.ceil(fps / 10) for a, b in zip(released, plan.frame_indices))


def test_released_caps_for_long_videos():
    ten_min = _info(600, 30.0)
    plan = plan_frames(ten_min)  # 5 fps * 600 s = 3000 frames > 540: released cap 540 frames, packing 3
    assert (len(plan.frame_indices), plan.packing, len(plan.packages)) == (540, 3, 180)
    plan = plan_frames(ten_min, fps=10, packing=1)  # explicit packing: 180 packages of 1 (demo: 540)
    assert (len(plan.frame_indices), len(plan.packages)) == (180, 180)
    minute = plan_frames(_info(60, 30.0))  # 300 frames -> packing 2 (demo: ceil(300/180) = 2)
    assert (len(minute.frame_indices), minute.packing, len(minute.packages)) == (300, 2, 150)
    # 36.5 s at 5 fps: the demo tests 5*int(36.5) = 180 <= 180 and emits 182 packages; we pack by 2.
    odd = plan_frames(_info(36.5, 30.0))
    assert (len(odd.frame_indices), odd.packing, len(odd.packages)) == (182, 2, 91)


def test_token_budget_grows_packing_then_lowers_fps():
    twenty_s = _info(20, 30.0)  # 100 frames at 5 fps
    plan = plan_frames(twenty_s, max_visual_tokens=64 * 50)
    assert (len(plan.frame_indices), plan.packing, len(plan.packages)) == (100, 2, 50)
    plan = plan_frames(twenty_s, max_visual_tokens=64 * 10 + 63, query_num=64)
    assert (len(plan.frame_indices), plan.packing, len(plan.packages)) == (30, 3, 10)
    plan = plan_frames(twenty_s, max_visual_tokens=640, query_num=32)  # 20 packages of 32 tokens
    assert (plan.packing, len(plan.packages)) == (3, 20)


@pytest.mark.parametrize("bad, words", [({"fps": 10.5}, "fps"), ({"fps": 0}, "fps"), ({"packing": 0}, "packing"),
                                        ({"packing": 7}, "packing"), ({"max_frames": 0}, "max_frames"),
                                        ({"max_visual_tokens": 63}, "max_visual_tokens")])
def test_bad_knobs(bad, words):
    with pytest.raises(ValueError, match=words):
        plan_frames(SIX_S, **bad)
    with pytest.raises(ValueError, match=words):  # checked before the (missing) file is touched
        load_video("/nonexistent/video.mp4", **bad)


# ------------------------------------------------------------------------------------------------------------- decode

def test_probe_headers(vids):
    info = probe_video(vids["mp4"])
    assert (info.fps, info.n_frames, info.duration, info.width, info.height) == (30.0, 180, 6.0, W, H)
    assert not info.counted and info.source == str(vids["mp4"])
    mkv = probe_video(vids["mkv"])  # matroska has no frame count: demux counting pass
    assert (mkv.n_frames, mkv.fps, mkv.counted) == (180, 30.0, True)


@pytest.mark.parametrize("method", ["auto", "seek", "sequential"])
@pytest.mark.parametrize("fps", [1, 5, 10])
def test_decoded_frames_are_the_planned_ones(vids, method, fps):
    clip = load_video(vids["mp4"], fps=fps, method=method)
    assert clip.plan == plan_frames(clip.info, fps=fps)
    assert [_read_index(f) for f in clip.frames] == clip.plan.frame_indices
    assert all(f.mode == "RGB" and f.size == (W, H) for f in clip.frames)
    for t, tid in zip(clip.plan.timestamps, clip.plan.temporal_ids):
        assert abs(tid * 0.1 - t) <= 0.05 + 1e-9


class _CountingContainer:
    """Wraps a PyAV container to count decoded frames and seeks."""

    def __init__(self, container, stats):
        self._c, self._stats = container, stats

    def __getattr__(self, name):
        return getattr(self._c, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._c.close()

    def seek(self, *args, **kwargs):
        self._stats["seeks"] += 1
        return self._c.seek(*args, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self._c.decode(*args, **kwargs):
            self._stats["decoded"] += 1
            yield frame


@pytest.mark.parametrize("fps", [1, 5])
def test_auto_decodes_no_more_than_seek_or_sequential(vids, fps, monkeypatch):
    real_open, stats = video._open_container, {}
    monkeypatch.setattr(video, "_open_container", lambda *a: _CountingContainer(real_open(*a), stats))
    cost = {}
    for method in ("auto", "seek", "sequential"):
        stats.update(seeks=0, decoded=0)
        load_video(vids["mp4"], fps=fps, method=method)  # keyframe every 12 frames (0.4 s)
        cost[method] = dict(stats)
    assert cost["auto"]["decoded"] <= min(cost["seek"]["decoded"], cost["sequential"]["decoded"])
    if fps == 1:  # sampled frames 30 apart, keyframes 12 apart: auto must seek and skip most frames
        assert cost["auto"]["seeks"] > 0 and cost["auto"]["decoded"] < cost["sequential"]["decoded"] / 2


@pytest.mark.parametrize("kind", ["mpeg4", "mkv"])
def test_other_codecs_and_containers(vids, kind):
    clip = load_video(vids[kind], fps=3, packing=3)
    assert [_read_index(f) for f in clip.frames] == list(range(5, 180, 10))
    assert clip.plan.packages[0] == [2, 5, 8]


@pytest.mark.parametrize("method", ["auto", "seek", "sequential"])
def test_stream_starting_late(vids, method):
    clip = load_video(vids["offset"], fps=5, method=method)
    assert clip.info.start_time == 1.0
    assert [_read_index(f) - 30 for f in clip.frames] == list(range(3, 180, 6))


@pytest.mark.parametrize("method", ["auto", "seek", "sequential"])
def test_dropped_frames_give_the_frame_on_screen(vids, method):
    clip = load_video(vids["gaps"], fps=5, method=method)  # 170 frames over 6 s: average rate 28.33 fps
    present = [i for i in range(N) if not 90 <= i < 100]
    # oracle: the frame on screen at t is the last one that starts by t (+ a quarter frame for pts rounding)
    on_screen = [max(i for i in present if i / FPS <= t + 0.25 / clip.info.fps) for t in clip.plan.timestamps]
    assert [_read_index(f) for f in clip.frames] == on_screen
    assert 89 in on_screen and len(clip.frames) == 30


def test_bytes_input(vids):
    data = vids["mp4"].read_bytes()
    clip = load_video(data, fps=2)
    assert [_read_index(f) for f in clip.frames] == list(range(7, 173, 15))
    assert probe_video(data).n_frames == 180 and "bytes" in clip.info.source


def test_truncated_header_is_an_error(vids, tmp_path):
    data = vids["mpeg4"].read_bytes()  # moov atom at the end: cutting the file loses the index
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="cut.mp4.*not a readable video"):
        load_video(bad)


def test_truncated_data_uses_the_decodable_prefix(vids, tmp_path):
    data = vids["mp4"].read_bytes()  # faststart: the header survives, the frames after the cut do not
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    assert probe_video(cut).n_frames == 180  # the header still claims all frames
    with pytest.warns(UserWarning, match="cut.mp4.*truncated"):
        clip = load_video(cut, fps=5)
    assert 0 < clip.info.n_frames < 180
    assert [_read_index(f) for f in clip.frames] == clip.plan.frame_indices  # no frame out of place
    assert clip.plan == plan_frames(clip.info, fps=5) and clip.plan.frame_indices[-1] < clip.info.n_frames


def test_header_without_any_frame_data(vids, tmp_path):
    data = vids["mp4"].read_bytes()
    mdat = data.index(b"mdat")  # faststart: everything before mdat is the header
    cut = tmp_path / "headonly.mp4"
    cut.write_bytes(data[: mdat + 8])
    with pytest.raises(VideoError, match="headonly.mp4"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_video(cut)


def test_bad_inputs(vids, tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "notes.txt").write_text("not a video\n" * 20)
    (tmp_path / "zero.mp4").write_bytes(b"")
    cases = [(tmp_path / "missing.mp4", "missing.mp4: no such file"),
             (tmp_path, "not a regular file"),
             (tmp_path / "zero.mp4", "zero.mp4: empty file"),
             (b"", "empty input"),
             (tmp_path / "noise.mp4", "noise.mp4: not a readable video"),
             (tmp_path / "notes.txt", "notes.txt: not a readable video"),
             (vids["audio"], "audio.wav: no video stream .*audio"),
             (vids["empty"], "empty.avi: video stream has no frames")]
    for src, msg in cases:
        for fn in (probe_video, load_video):
            with pytest.raises(VideoError, match=msg):
                fn(src)
    assert issubclass(VideoError, ValueError)
    with pytest.raises(TypeError, match="path or bytes"):
        probe_video(123)


def test_frame_count_bound_is_explicit():
    # the largest plan there is: 10 fps over a 10-minute video with the largest explicit packing
    plan = plan_frames(_info(600, 60.0), fps=10, packing=6)
    assert len(plan.frame_indices) == MAX_VIDEO_FRAMES == MAX_NUM_PACKAGES * 6 == 1080


# ------------------------------------------------------------------------------------ containers, codecs, odd streams

# What phones, screen recorders, browsers and broadcast captures write: (file, codec, fps, writer options).
KINDS = {
    "mp4/h264": ("clip.mp4", "libx264", FPS, {"gop": 12}),
    "mov/h264": ("clip.mov", "libx264", FPS, {"gop": 12}),
    "mkv/vp9": ("clip.mkv", "libvpx-vp9", FPS, {}),
    "webm/vp8": ("clip.webm", "libvpx", FPS, {}),
    "webm/vp9": ("clip9.webm", "libvpx-vp9", FPS, {}),
    "avi/mjpeg": ("clip.avi", "mjpeg", FPS, {}),
    # broadcast-like: GOP of 12 with B-frames, first frame at 1.5 s; MPEG-TS seeks land a keyframe late
    "ts/mpeg2": ("clip.ts", "mpeg2video", FPS, {"gop": 12, "options": {"bf": "2"}, "pts": range(45, 105)}),
    "ts/h264": ("clip_h264.ts", "libx264", FPS, {"gop": 12, "pts": range(45, 105)}),
    "gif": ("clip.gif", "gif", 10, {}),  # GIF delays are in 1/100 s: 10 fps
}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    if av is None:
        pytest.skip("PyAV not installed (pip install 'vlmcook[video]')")
    d = tmp_path_factory.mktemp("kinds")
    out = {}
    for kind, (name, codec, fps, kw) in KINDS.items():
        pts = kw.get("pts", range(60 if fps == FPS else 30))
        out[kind] = (_write(d / name, codec=codec, fps=fps, **{"n": len(pts), **kw}), fps, len(pts), pts[0])
    return out


@pytest.mark.parametrize("method", ["auto", "seek", "sequential"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_containers_and_codecs_decode_the_planned_frames(kinds, kind, method):
    path, fps, n, first = kinds[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete file: no "truncated" fallback
        clip = load_video(path, fps=5, method=method)
    assert (clip.info.n_frames, clip.info.fps, clip.info.start_time) == (n, fps, pytest.approx(first / fps))
    assert clip.plan == plan_frames(clip.info, fps=5) and len(clip.frames) == len(clip.plan.frame_indices)
    assert [_read_index(f) - first for f in clip.frames] == clip.plan.frame_indices
    assert all(f.mode == "RGB" and f.size == (W, H) for f in clip.frames)


@pytest.mark.parametrize("kind", ["ts/mpeg2", "mkv/vp9"])
def test_cut_stream_decodes_its_prefix(kinds, kind, tmp_path):
    path, fps, n, first = kinds[kind]
    data = path.read_bytes()  # these headers hold no frame count: the counting pass sees the cut
    cut = tmp_path / path.name
    cut.write_bytes(data[: len(data) * 6 // 10])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_video(cut, fps=5)
    assert 0 < clip.info.n_frames < n
    assert [_read_index(f) - first for f in clip.frames] == clip.plan.frame_indices


@pytest.mark.parametrize("name, codec, fps", [("vfr.mp4", "libx264", FPS), ("vfr.mkv", "libx264", FPS),
                                             ("vfr.webm", "libvpx-vp9", FPS), ("vfr.ts", "libx264", FPS),
                                             ("vfr.gif", "gif", 10)])
def test_variable_frame_rate_gives_the_frame_on_screen(tmp_path, name, codec, fps):
    # 6 s: 1 s at the full rate, 3 s at a third of it, 2 s at half of it (a screen recording slows when idle).
    # mkv/webm/ts/gif headers guess the average rate from the first frames (here: the full rate).
    pts = list(range(0, fps)) + list(range(fps, 4 * fps, 3)) + list(range(4 * fps, 6 * fps, 2))
    clip = load_video(_write(tmp_path / name, pts=pts, fps=fps, codec=codec), fps=5)
    length = (pts[-1] + 1) / fps  # the writer shows the last frame for 1 / fps
    assert clip.info.n_frames == len(pts) and clip.info.fps == pytest.approx(len(pts) / length, rel=0.05)
    # oracle: the last frame that starts by t (+ a quarter frame for pts rounding), t = index / average fps
    on_screen = [max(p for p in pts if p / fps <= t + 0.25 / clip.info.fps) for t in clip.plan.timestamps]
    assert [_read_index(f) for f in clip.frames] == on_screen
    assert on_screen[-1] / fps > 5  # the samples span the whole video (the first-frames rate would stop at 3 s)


@pytest.mark.parametrize("name, rotate", [("phone.mp4", -90), ("phone.mov", 90), ("upside.mp4", 180)])
def test_rotated_video_comes_back_upright(tmp_path, name, rotate):
    frame = _index_frame(165)
    frame[:8] = 255  # a white top band: no rotation of this frame looks like another
    path = write_video(tmp_path / name, [frame] * 6, FPS, rotate=rotate)
    info = probe_video(path)
    clip = load_video(path, fps=5)
    # Oracle: ffmpeg's players rotate the stored frame counter-clockwise by the display matrix's angle (which is
    # what set_display_rotation takes); np.rot90 turns counter-clockwise for k > 0.
    upright = np.rot90(frame, k=rotate // 90)
    got = np.asarray(clip.frames[0], dtype=np.float32)
    assert got.shape == upright.shape and (info.width, info.height) == clip.frames[0].size
    assert info.rotation == rotate % 360
    assert np.abs(got - upright).mean() < 8  # x264 at crf 18
    assert np.abs(got - np.rot90(frame, k=rotate // 90 + 2)).mean() > 25  # the opposite turn is far off


def _counting_av_open(monkeypatch) -> list:
    calls, real = [], av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kind", ["mp4/h264", "mkv/vp9", "ts/mpeg2", "gif", "bytes"])
@pytest.mark.parametrize("method", ["auto", "seek", "sequential"])
def test_a_video_is_opened_once(kinds, kind, method, monkeypatch):
    src = kinds["mp4/h264"][0].read_bytes() if kind == "bytes" else kinds[kind][0]
    calls = _counting_av_open(monkeypatch)
    assert probe_video(src).n_frames > 0 and len(calls) == 1
    load_video(src, fps=5, method=method)
    assert len(calls) == 2
    with open_video(src) as v:  # the processor's path: headers, a plan, its memory, then the pixels
        plan = v.plan(fps=2, packing=2)
        assert decoded_bytes(v.info, plan) == len(plan.frame_indices) * W * H * 4
        first = v.decode(plan, method)
        again = v.decode(v.plan(fps=5), method)  # and again from the same container
    assert len(calls) == 3
    shift = 0 if kind == "bytes" else kinds[kind][3]
    assert [_read_index(f) - shift for f in first.frames] == plan.frame_indices
    assert [_read_index(f) - shift for f in again.frames] == again.plan.frame_indices


def test_frame_pixel_limit_is_checked_before_any_decoding(vids, monkeypatch):
    stats = {"decoded": 0, "seeks": 0}
    real_open = video._open_container
    monkeypatch.setattr(video, "_open_container", lambda *a: _CountingContainer(real_open(*a), stats))
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", W * H)  # at the limit: accepted
    assert probe_video(vids["mp4"]).width == W and stats["decoded"] > 0
    stats["decoded"] = 0
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", W * H - 1)
    for fn in (probe_video, load_video, open_video):
        with pytest.raises(VideoError, match=f"clip.mp4: frames of {W}x{H} = 8,192 pixels .*MAX_FRAME_PIXELS"):
            fn(vids["mp4"])
    assert stats["decoded"] == 0


def test_truncated_file_is_replanned_with_the_same_knobs(vids, tmp_path):
    data = vids["mp4"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with open_video(cut) as v, pytest.warns(UserWarning, match="truncated"):
        clip = v.decode(v.plan(fps=3, packing=2, max_visual_tokens=64 * 4))
    assert clip.plan == plan_frames(clip.info, fps=3, packing=2, max_visual_tokens=64 * 4)
    assert clip.info.n_frames < N and len(clip.plan.packages) <= 4
    assert [_read_index(f) for f in clip.frames] == clip.plan.frame_indices


def test_a_plan_from_another_video_is_refused(vids):
    with open_video(vids["mp4"]) as v, pytest.raises(ValueError, match="plan samples frame"):
        v.decode(plan_frames(_info(60, 30.0)))


def test_a_frame_larger_than_its_header_is_refused():
    # two MPEG-TS files back to back are one valid stream whose size changes: decoded_bytes from the header would
    # no longer bound the memory
    first = write_video(None, [_index_frame(i)[:32, :64] for i in range(30)], FPS, "mpeg2video", "mpegts")
    bigger = write_video(None, [_index_frame(i) for i in range(30, 60)], FPS, "mpeg2video", "mpegts", pts=range(30, 60))
    assert (probe_video(first + bigger).width, probe_video(first + bigger).height) == (64, 32)
    with pytest.raises(VideoError, match="a frame of 128x64 is larger than the header's 64x32"):
        load_video(first + bigger, fps=5)


def test_decoded_bytes_budget_documented_cases():
    def frames_of(w, h, n):
        info = VideoInfo(duration=n / 30, fps=30.0, n_frames=n, width=w, height=h, source="header")
        return decoded_bytes(info, plan_frames(info, fps=10, packing=6))  # 10 fps of 30: every third frame

    assert frames_of(4096, 4096, 64 * 3) > video.MAX_DECODED_BYTES  # the 48 KB request that took 4 GB
    assert frames_of(3840, 2160, 64 * 3) <= video.MAX_DECODED_BYTES  # 64 frames of 4K UHD
    assert frames_of(1280, 720, 540 * 3) <= video.MAX_DECODED_BYTES  # the released automatic cap at 720p
