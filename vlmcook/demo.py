"""The main job on the embedded default: the `tiny` preset on the CPU.

Until the training recipe lands this is a smoke run of the whole inference path on an untrained tiny model: a
generated image and a generated video go through the processor (slicing, 3D packages, token accounting), the model
(packed vision tower, resampler, Qwen3), a checkpoint round trip in the released layout, and a few greedy decode
steps with the KV cache. It leaves `runs/demo/model`, the checkpoint `vlmcook chat` uses by default.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def _image(seed: int) -> Image.Image:
    img = Image.new("RGB", (640, 360), "white")
    d = ImageDraw.Draw(img)
    for i in range(6):
        x = 40 + 95 * i + seed % 7
        d.rectangle([x, 60 + 20 * (i % 3), x + 70, 260], fill=(40 * i, 200 - 30 * i, 90))
    d.text((40, 300), "vlmcook demo", fill="black")
    return img


def _video(seconds: float = 3.0, fps: int = 10) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 160, 112, "yuv420p"
        for i in range(int(seconds * fps)):
            img = Image.new("RGB", (160, 112), "black")
            ImageDraw.Draw(img).ellipse([5 + 4 * i, 40, 35 + 4 * i, 70], fill="yellow")  # a ball moving right
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def run(out: str = "runs/demo", seed: int = 0) -> int:
    from vlmcook.checkpoint import load_model, save_model
    from vlmcook.config import PRESETS
    from vlmcook.data.processor import Processor
    from vlmcook.data.tokenizer import Tokenizer
    from vlmcook.model.minicpmv import MiniCPMV

    torch.manual_seed(seed)
    cfg = PRESETS["tiny"]
    tok = Tokenizer.tiny()
    proc = Processor(tok, cfg)
    messages = [{"role": "user", "content": [
        _image(seed), {"type": "video", "video": _video(), "fps": 10, "packing": 3},
        "Which way does the ball move?"]}]
    count = proc.count_tokens(messages)
    print(f"[demo] prompt: {count.total} tokens ({count.visual_tokens} visual in {count.packages} package(s), "
          f"{count.views} views)")
    sample = proc(messages)
    folder = Path(out) / "model"
    t = time.perf_counter()
    save_model(MiniCPMV(cfg), folder, tokenizer=tok)
    model = load_model(folder)
    print(f"[demo] untrained tiny model saved and reloaded in {time.perf_counter() - t:.2f} s: {folder}")
    ids = sample["input_ids"]
    batch = {k: sample[k] for k in ("pixel_values", "temporal_ids", "image_bound")}
    with torch.no_grad():
        t = time.perf_counter()
        cache = model.llm.new_cache(1, ids.shape[1] + 16)
        logits = model(ids, cache=cache, **batch).logits
        prefill = time.perf_counter() - t
        new = []
        for _ in range(16):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if int(nxt) in tok.stop_ids:
                break
            new.append(int(nxt))
            logits = model(nxt, cache=cache).logits
    print(f"[demo] prefill {ids.shape[1]} tokens in {prefill * 1000:.0f} ms; greedy reply of the UNTRAINED model: "
          f"{tok.decode(new)!r}")
    print("[demo] this is a smoke run: the training recipe (a later milestone) replaces it with a trained model.")
    return 0
