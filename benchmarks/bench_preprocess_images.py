"""Image preprocessing speed: vlmcook.data.image vs a straightforward re-statement of the released approach.

1. Per image (a decoded PIL RGB image, random pixels), sizes up to 4032x3024: ours = `preprocess_image` (resize,
   crop, one table gather per view into [3, 14h, 14w]). Reference re-statement = the release's steps in plain
   Python: copy + resize the overview, resize the refined image, crop cells in loops, per view numpy float32 /255,
   (x - mean) / std, HWC -> CHW, then the per-view patch-strip reshape (unfold) the released processor hands to
   the model. Both produce the same pixels (checked here); best of --repeats, the two interleaved.
2. Token accounting: `Processor.count_tokens` (header only) vs the full processor on a 4032x3024 JPEG file.

    python benchmarks/bench_preprocess_images.py [--repeats N]
"""
import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlmcook.config import MiniCPMVConfig  # noqa: E402
from vlmcook.data import image as im  # noqa: E402
from vlmcook.data.processor import Processor  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402

SIZES = [(224, 224), (448, 448), (1000, 600), (1280, 720), (1920, 1080), (2048, 1536), (4032, 3024)]


def reference_views(img: Image.Image, scale=448, patch=14, max_slice=9) -> list[torch.Tensor]:
    """The released steps, restated: PIL resizes, crops in Python loops, numpy normalisation, strip reshape."""
    grid = im.slice_grid(img.size, scale, max_slice)
    if grid is None:
        views = [img.resize(im.best_resize(img.size, scale, patch, upscale=True), Image.Resampling.BICUBIC)]
    else:
        views = [img.copy().resize(im.best_resize(img.size, scale, patch), Image.Resampling.BICUBIC)]
        refined = img.resize(im.refine_size(img.size, grid, scale, patch), Image.Resampling.BICUBIC)
        cw, ch = refined.width // grid[0], refined.height // grid[1]
        for top in range(0, refined.height, ch):
            for left in range(0, refined.width, cw):
                views.append(refined.crop((left, top, left + cw, top + ch)))
    mean = std = np.array([0.5, 0.5, 0.5], dtype=np.float32)
    strips = []
    for v in views:
        x = (np.array(v).astype(np.float32) / 255 - mean) / std  # [H, W, 3]
        t = torch.from_numpy(x.transpose(2, 0, 1).copy())  # [3, H, W]
        cols = torch.nn.functional.unfold(t, (patch, patch), stride=(patch, patch))  # [3*P*P, L]
        strips.append(cols.reshape(3, patch, patch, -1).permute(0, 1, 3, 2).reshape(3, patch, -1))  # [3, P, L*P]
    return strips


def _strip(view: torch.Tensor, patch=14) -> torch.Tensor:
    cols = torch.nn.functional.unfold(view, (patch, patch), stride=(patch, patch))
    return cols.reshape(3, patch, patch, -1).permute(0, 1, 3, 2).reshape(3, patch, -1)


def best_of(fns, repeats: int) -> list[float]:
    """Best time of each function, interleaved run by run so a busy machine slows all of them alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    print("1. preprocessing one decoded image (best of %d, 1 torch thread)" % args.repeats)
    print("   'PIL resizes' = the two bicubic resizes + crops alone, which both sides must do (bit-exactness)")
    print(f"{'size':>11} {'views':>5} {'ours ms':>9} {'reference ms':>13} {'speed-up':>9} {'PIL resizes ms':>15}")
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = im.preprocess_image(img).views
        ref = reference_views(img)
        assert len(ours) == len(ref) and all(torch.equal(_strip(o), r) for o, r in zip(ours, ref)), (w, h)
        layout = im.image_layout(img.size)
        t_ours, t_ref, t_resize = best_of([lambda: im.preprocess_image(img), lambda: reference_views(img),
                                           lambda: im.view_images(img, layout)], args.repeats)
        print(f"{w:>5}x{h:<5} {len(ours):>5} {t_ours * 1e3:>9.1f} {t_ref * 1e3:>13.1f} {t_ref / t_ours:>8.2f}x "
              f"{t_resize * 1e3:>15.1f}")

    print("\n2. token accounting vs full processing of a 4032x3024 JPEG file (v4_5 numbers, tiny tokenizer)")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (3024, 4032, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    proc = Processor(Tokenizer.tiny(), MiniCPMVConfig.from_name("v4_5"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": data}, "What is this?"]}]
    t_count, t_full = best_of([lambda: proc.count_tokens(msgs), lambda: proc(msgs)], max(1, args.repeats // 2))
    n = proc.count_tokens(msgs).total
    print(f"{'count_tokens ms':>16} {'processor ms':>13} {'ratio':>9}   ({n} tokens)")
    print(f"{t_count * 1e3:>16.2f} {t_full * 1e3:>13.1f} {t_full / t_count:>8.0f}x")


if __name__ == "__main__":
    main()
