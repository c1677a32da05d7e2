"""Video decode + sample speed and memory (vlmcook.data.video).

1. Time per minute of 720p video to sample at 1, 3, 5 and 10 fps (released caps: <= 540 frames), decoding by
   'sequential' pass, per-target 'seek', and the default 'auto', on a 2 s keyframe interval (streaming-like) and the
   8.3 s x264 default (keyint 250). Includes the RGB conversion of each sampled frame (the same in every method).
2. Peak RSS (in a fresh subprocess each) of sampling a 10-minute 720p video at 10 fps under the released cap
   (540 frames), against the same frame count from a 20 s video: memory follows the frames kept, not the length.

Test videos are written once into --cache (default /tmp/vlmcook_bench_video; the first run encodes ~2 min of
CPU time). To keep that cheap: the timing clips are 20 s (times scaled to per minute), libx264 preset superfast,
a slowly scrolling texture plus a moving block; the 10-minute video is 10 fps, preset ultrafast, mostly static
content (RSS does not depend on content; its decode time is not representative and not reported as such).
--full uses 60 s timing clips, adds per-frame seeking at 5 and 10 fps on the 8.3 s keyframe clip (minutes on its
own), and takes the best of 3 runs.

    python benchmarks/bench_video.py [--full] [--cache DIR]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import av  # noqa: E402
from media import write_video  # noqa: E402

from vlmcook.data.video import load_video, plan_frames, probe_video  # noqa: E402

W, H = 1280, 720
TARGET_FPS = (1, 3, 5, 10)
METHODS = ("sequential", "seek", "auto")


def _frames(n: int, scroll: int):
    """yuv420p frames: a smooth texture scrolling `scroll` px/frame and a moving block (cheap to generate)."""
    yy, xx = np.mgrid[0:H, 0:W]
    base = ((np.sin(xx / 37.0) + np.cos(yy / 23.0)) * 50 + 128).astype(np.uint8)
    v = np.full((H // 4, W), 100, np.uint8)
    u = np.full((H // 4, W), 128, np.uint8)
    for i in range(n):
        y = np.roll(base, scroll * i, axis=1) if scroll else base.copy()
        x0 = (7 * i) % (W - 160)
        y[300:460, x0:x0 + 160] = (5 * i) % 256
        yield av.VideoFrame.from_ndarray(np.concatenate([y, u, v + (i % 40)]), format="yuv420p")


def _encode(path: Path, seconds: int, fps: int, gop: int, preset: str, scroll: int) -> Path:
    if path.exists() and probe_video(path).n_frames == seconds * fps:
        return path
    print(f"  encoding {path.name}: {seconds} s {W}x{H} @ {fps} fps, keyint {gop}, x264 {preset} ...", flush=True)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".part.mp4")
    write_video(tmp, _frames(seconds * fps, scroll), fps, gop=gop, options={"preset": preset})
    tmp.rename(path)
    print(f"  ... {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _time_load(path: Path, fps: float, method: str, repeat: int) -> tuple[float, float, int, int]:
    """Best (CPU seconds, wall seconds) over `repeat` runs. CPU time (all threads) is the headline: on a shared
    machine wall time mostly measures the neighbours."""
    cpu = wall = float("inf")
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        clip = load_video(path, fps=fps, method=method)
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall, len(clip.frames), clip.plan.packing


def bench_speed(clips: dict[str, tuple[Path, tuple[int, ...]]], repeat: int) -> None:
    print("\n## decode + sample, CPU seconds per minute of 720p30 video (lower is better; wall for auto)")
    print(f"{'clip':<14}{'fps':>4}{'frames':>7}{'pack':>5}" + "".join(f"{m:>11}" for m in METHODS)
          + f"{'auto wall':>10}{'seek/seq':>9}{'auto/best':>10}")
    for name, (path, target_fps) in clips.items():
        per_min = 60.0 / probe_video(path).duration
        for fps in target_fps:
            row = {m: _time_load(path, fps, m, repeat) for m in METHODS}
            t = {m: row[m][0] * per_min for m in METHODS}
            _, wall, n, p = row["auto"]
            print(f"{name:<14}{fps:>4}{n:>7}{p:>5}" + "".join(f"{t[m]:>11.2f}" for m in METHODS)
                  + f"{wall * per_min:>10.2f}{t['seek'] / t['sequential']:>9.2f}"
                  + f"{t['auto'] / min(t['seek'], t['sequential']):>10.2f}", flush=True)


_CHILD = """
import json, sys, time
import av  # in the baseline too
from vlmcook.data.video import load_video
path, fps, max_frames = sys.argv[1], float(sys.argv[2]), (int(sys.argv[3]) or None)
t0 = time.perf_counter()
clip = None if fps == 0 else load_video(path, fps=fps, max_frames=max_frames)
dt = time.perf_counter() - t0
n = 0 if clip is None else len(clip.frames)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"rss_mb": hwm / 1024, "frames": n, "s": dt}))
"""


def _child(path: Path, fps: float, max_frames: int | None) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(fps), str(max_frames or 0)],
                         capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(short: Path, long: Path) -> None:
    print("\n## peak RSS (VmHWM of a fresh process each). Frames are kept as RGB PIL images; Pillow stores RGB at 4"
          "\n## bytes/pixel (RGBX), so 3.52 MiB per 720p frame = 'frames MB'; ratio = (peak - import) / frames MB")
    base = _child(short, 0, None)["rss_mb"]
    same = len(plan_frames(probe_video(short), fps=10).frame_indices)
    rows = [("import only", short, 0, None), (f"{probe_video(short).duration:.0f} s @ 10 fps", short, 10, None),
            ("10 min, same frames", long, 10, same), ("10 min @ 10 fps (cap)", long, 10, None)]
    print(f"{'case':<24}{'frames':>7}{'peak MB':>9}{'-import':>9}{'frames MB':>10}{'ratio':>7}{'time s':>8}")
    for label, path, fps, cap in rows:
        r = _child(path, fps, cap) if fps else {"rss_mb": base, "frames": 0, "s": 0.0}
        frames_mb = r["frames"] * W * H * 4 / 2**20
        extra = r["rss_mb"] - base
        ratio = f"{extra / frames_mb:>7.2f}" if frames_mb else f"{'-':>7}"
        print(f"{label:<24}{r['frames']:>7}{r['rss_mb']:>9.0f}{extra:>9.0f}{frames_mb:>10.0f}{ratio}{r['s']:>8.1f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="60 s timing clips, best of 3")
    ap.add_argument("--cache", default="/tmp/vlmcook_bench_video", help="where the test videos are kept")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    secs = 60 if args.full else 20
    print(f"videos in {cache} (written once)")
    gop2 = _encode(cache / f"gop2s_{secs}s.mp4", secs, 30, 60, "superfast", 1)
    gop8 = _encode(cache / f"gop8s_{secs}s.mp4", secs, 30, 250, "superfast", 1)
    long = _encode(cache / "long_10min_10fps.mp4", 600, 10, 20, "ultrafast", 0)
    # per-frame seeking at 5-10 fps with 8.3 s keyframe intervals alone takes minutes: --full only
    clips = {"keyint 2 s": (gop2, TARGET_FPS), "keyint 8.3 s": (gop8, TARGET_FPS if args.full else (1, 3))}
    bench_memory(gop2, long)
    bench_speed(clips, repeat=3 if args.full else 1)


if __name__ == "__main__":
    main()
