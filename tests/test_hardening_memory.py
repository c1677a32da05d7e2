"""Memory of one request (issue 16): the largest request `ChatModel.chat` admits under its limits stays within the
bound written in docs/reliability.md ("Memory of one request"), on the tiny model:

    peak anonymous RSS - anonymous RSS before <= 1.8 x D + 1.5 x V x 12 x scale_resolution^2 + 200 MiB

D = decoded bytes of the request's images and frames (Processor.max_decoded_bytes bounds it, 2 GiB by default),
V = views (each a float32 RGB tensor of about scale_resolution^2 pixels, all held until the model call). 1.8, not 1:
after glibc raises its mmap threshold (any earlier large allocation, e.g. reading a PNG's EXIF), each frame's freed
3-byte conversion buffer stays resident between the 4-byte frames. Each case runs in a fresh process that samples its
RssAnon every 2 ms (total RSS also counts library pages, which the kernel evicts and re-reads under memory pressure:
+410 MiB instead of +98 MiB for the same request while other jobs filled the machine). The request just over the
budget is refused from the headers, before any frame is decoded. The default-budget case (2 GiB) is slow."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from media import write_video
from test_hardening_cli import model_dir  # noqa: F401  (fixture: a tiny checkpoint folder)
from vlmcook.config import PRESETS
from vlmcook.data import video as vid

MiB = 2**20
PROBE = """
import json, sys, threading, time
import torch
torch.set_num_threads(1)
from vlmcook.infer.api import ChatModel

def anon():  # resident anonymous memory: what the request allocates, not library pages the kernel may evict
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

model, budget, content = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
cm = ChatModel.load(model)
cm.processor.max_decoded_bytes = budget
messages = [{"role": "user", "content": content + ["Describe."]}]
count = cm.count_tokens(messages)  # opens the media (imports PyAV) before the baseline is taken
before, peak, done = anon(), [0], threading.Event()

def sample():  # every 2 ms; the peak is a plateau (all frames held while their views are made)
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
cm.chat(messages, max_new_tokens=2, temperature=0)
done.set()
sampler.join()
print(json.dumps({"delta": max(peak[0], anon()) - before, "views": count.views}))
"""


def rss_bound(decoded: int, views: int, scale: int) -> float:
    return 1.8 * decoded + 1.5 * views * 12 * scale**2 + 200 * MiB


def _clip(path: Path, frames: int, w: int, h: int) -> Path:
    base = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return write_video(path, (np.roll(base, 7 * k, axis=1) for k in range(frames)), fps=10,
                       options={"preset": "ultrafast", "crf": "30"})


def _probe(model_dir: Path, budget: int, content: list) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), str(budget), json.dumps(content)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _largest(model_dir, tmp_path, budget: int, frames: int, w: int, h: int, image: tuple[int, int]):
    """A video of `frames` w x h frames (all sampled, packing 6) and a PNG image that together fill `budget`
    within 1%; the same video two rows taller per frame is refused from the headers (count_tokens decodes
    nothing)."""
    from PIL import Image

    from vlmcook.infer.api import ChatModel

    Image.fromarray(np.zeros((image[1], image[0], 3), np.uint8)).save(tmp_path / "page.png")
    decoded = (frames * w * h + image[0] * image[1]) * vid.BYTES_PER_PIXEL
    assert 0.99 * budget < decoded <= budget
    item = {"type": "video", "fps": 10, "packing": 6, "max_frames": frames}
    fit = [{"type": "image", "image": str(tmp_path / "page.png")},
           {**item, "video": str(_clip(tmp_path / "fit.mp4", frames, w, h))}]
    over = [fit[0], {**item, "video": str(_clip(tmp_path / "over.mp4", frames, w, h + 2))}]
    cm = ChatModel.load(model_dir)
    cm.processor.max_decoded_bytes = budget
    for call in (cm.count_tokens, cm.chat):
        with pytest.raises(ValueError, match="more than the limit"):
            call([{"role": "user", "content": over + ["Describe."]}])
    got = _probe(model_dir, budget, fit)
    bound = rss_bound(decoded, got["views"], PRESETS["tiny"].scale_resolution)
    assert got["delta"] <= bound, f"peak anonymous RSS +{got['delta'] / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
    return got, decoded, bound


def test_largest_request_under_a_small_budget(model_dir, tmp_path):
    # 32 MiB: 30 frames of 512 x 512 (30 MiB) + a 1024 x 500 page (2 MiB)
    got, decoded, bound = _largest(model_dir, tmp_path, 32 * MiB, 30, 512, 512, (1024, 500))
    print(f"decoded {decoded / MiB:.0f} MiB, views {got['views']}: peak anonymous RSS +{got['delta'] / MiB:.0f} MiB "
          f"(bound {bound / MiB:.0f} MiB)")


@pytest.mark.slow
def test_largest_request_under_the_default_budget(model_dir, tmp_path):
    # 2 GiB (video.MAX_DECODED_BYTES): 1080 frames (video.MAX_VIDEO_FRAMES) of 704 x 704 + a 1500 x 1000 page
    got, decoded, bound = _largest(model_dir, tmp_path, vid.MAX_DECODED_BYTES, 1080, 704, 704, (1500, 1000))
    print(f"decoded {decoded / MiB:.0f} MiB, views {got['views']}: peak anonymous RSS +{got['delta'] / MiB:.0f} MiB "
          f"(bound {bound / MiB:.0f} MiB)")
