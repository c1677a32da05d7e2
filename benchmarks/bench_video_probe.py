"""Where is the video signal lost? Linear probes on the resampler's outputs, and what a temporal id can change.

    python benchmarks/bench_video_probe.py [CHECKPOINT ...] [--n 800]

For each model (an untrained `demo` model with the from-scratch init, plus each checkpoint given, e.g. the demo's
runs/demo/model), synthetic video frames (196 x 98, the demo's palette) go through the vision tower and the
resampler only; a linear probe (logistic regression on the flattened [Q, D] outputs, 75% / 25% split) then
predicts:
  colour   the colour of the one disc in a frame (6 classes)     column  which third its centre is in (3)
  row      upper / lower half (2)                                when    which of a package's 4 frames shows it (4)
and, exactly, how much a package's output moves when its temporal ids shift by 1 s (max |delta| / max |output|):
for one frame, for 4 identical frames, and for 4 different frames. The temporal embedding is added to the keys
only (docs/reference.md 5.3): it can only re-weight a package's frames, so it cannot mark the time of a static
package (the first two must be ~0) and the LLM learns a package's time from its place in the sequence.
"""

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.demo import untrained  # noqa: E402
from vlmcook.config import PRESETS  # noqa: E402
from vlmcook.data.docs.grid import VIEW_SIZE  # noqa: E402
from vlmcook.data.processor import Processor  # noqa: E402
from vlmcook.data.synth_images import BACKGROUND, COLOURS  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402


def frame(colour, cx, cy, r=14):
    img = Image.new("RGB", VIEW_SIZE, BACKGROUND)
    if colour is not None:
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    return img


def disc(rng):
    W, H = VIEW_SIZE
    return rng.choice(list(COLOURS)), rng.uniform(0.15, 0.85) * W, rng.uniform(0.2, 0.8) * H


@torch.no_grad()
def outputs(model, proc, frames, package) -> torch.Tensor:
    """[Q, D] resampler output of one package of `frames` with temporal ids `package`."""
    s = proc([{"role": "user", "content": [{"type": "video", "frames": frames, "packages": [package]}, "."]}])
    return model.encode_views(s["pixel_values"][0], s["temporal_ids"][0])[0]


def probe(X: np.ndarray, y: list[int], classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a linear softmax probe (Adam, weight decay 1e-3) on standardised features."""
    torch.manual_seed(0)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
    n = int(0.75 * len(y))
    X = (X - X[:n].mean(0)) / (X[:n].std(0) + 1e-6)
    lin = torch.nn.Linear(X.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(X[:n]), y[:n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float((lin(X[n:]).argmax(1) == y[n:]).float().mean())


def measure(model, n: int) -> dict:
    model.eval()
    proc = Processor(Tokenizer.tiny(chars=True), model.config)
    rng, cols = random.Random(0), list(COLOURS)
    feats, y_col, y_x, y_y = [], [], [], []
    for i in range(n):
        c, cx, cy = disc(rng)
        feats.append(outputs(model, proc, [frame(c, cx, cy)], [rng.randrange(100)]).flatten().numpy())
        y_col.append(cols.index(c))
        y_x.append(min(2, int(3 * cx / VIEW_SIZE[0])))
        y_y.append(int(2 * cy / VIEW_SIZE[1]))
    X = np.stack(feats)
    res = {"colour": probe(X, y_col, len(cols)), "column": probe(X, y_x, 3), "row": probe(X, y_y, 2)}
    feats, y_t = [], []
    for i in range(n):
        c, cx, cy = disc(rng)
        k, t0 = rng.randrange(4), rng.randrange(60)
        feats.append(outputs(model, proc, [frame(c if j == k else None, cx, cy) for j in range(4)],
                             [t0 + 5 * j for j in range(4)]).flatten().numpy())
        y_t.append(k)
    res["when"] = probe(np.stack(feats), y_t, 4)
    # what shifting the temporal ids by 10 (1 s) changes
    c, cx, cy = disc(rng)
    one, same = [frame(c, cx, cy)], [frame(c, cx, cy)] * 4
    diff = [frame(c if j == 1 else None, cx, cy) for j in range(4)]
    for name, frames in (("shift_1_frame", one), ("shift_4_same", same), ("shift_4_different", diff)):
        ids = [5 * j for j in range(len(frames))]
        a, b = outputs(model, proc, frames, ids), outputs(model, proc, frames, [t + 10 for t in ids])
        res[name] = float((a - b).abs().max() / a.abs().max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", help="model folders to probe besides the untrained init")
    ap.add_argument("--n", type=int, default=800, help="frames / packages per probe (default 800)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from vlmcook.checkpoint import load_model

    models = [("untrained (from-scratch init)", untrained(PRESETS["demo"], 0))]
    models += [(c, load_model(c, dtype="float32")) for c in args.checkpoints]
    print("| model | colour | column | row | when (4 frames) | shift 1 frame | shift 4 same | shift 4 different |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model in models:
        r = measure(model, args.n)
        print(f"| {name} | {r['colour']:.2f} | {r['column']:.2f} | {r['row']:.2f} | {r['when']:.2f} | "
              f"{r['shift_1_frame']:.1e} | {r['shift_4_same']:.1e} | {r['shift_4_different']:.1e} |", flush=True)
    print("chance: colour 0.17, column 0.33, row 0.50, when 0.25")


if __name__ == "__main__":
    main()
