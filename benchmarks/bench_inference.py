"""Inference speed and memory on CPU (vlmcook.infer): a v4_5-shaped model scaled down, random weights.

Model: the released architecture (SigLIP NaViT tower, 64-query 3D resampler, Qwen3 GQA decoder, 448-px views) at
LLM hidden 512 x 4 layers (8 heads, 2 KV heads), vision hidden 128 x 2 layers, vocab 512 (the tiny tokenizer).
The vision size keeps the released balance for video: per frame (one ~1036-patch view) the 8B model spends about as
many FLOPs in the vision tower (~1e12) as in the LLM on its 64 tokens at packing 1; here ~2e9 each.
Random weights: speed and memory do not depend on them (greedy decoding with stop tokens disabled, so every run
generates exactly the requested number of tokens).

1. Text: prefill tokens/s (1024-token prompt), decode tokens/s at batch 1 and batch 4 (prompts of 64-128 tokens,
   left-padded; aggregate throughput), time to first token for a 128-token text prompt and for one 448x448 image.
2. A 1-minute 320x240 @ 10 fps video (written with PyAV), sampled at 1 fps (60 frames; --video-fps 3 gives 180,
   the package cap, ~3x slower) with packing 1 / 3 / 6: visual tokens, video decode + preprocessing time, prefill
   latency (vision tower + resampler + LLM), peak RSS growth during the request (Linux VmHWM, reset per run),
   KV-cache size. Ratios vs packing 1. The vision tower's cost is the same at every packing (same frames); the
   resampler and the LLM prefill shrink with the packages.

Default 1 thread: on a shared 2-core machine a second intra-op thread that has to wait for a busy core makes
small-op decoding several times slower (measured 3x); use --threads 2 on an idle machine.

    python benchmarks/bench_inference.py [--threads N] [--new-tokens N] [--video-fps F]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from media import write_video  # noqa: E402
from vlmcook.config import LLMConfig, MiniCPMVConfig, ResamplerConfig, VisionConfig  # noqa: E402
from vlmcook.data.tokenizer import Tokenizer  # noqa: E402
from vlmcook.infer import ChatModel, Engine, SamplingParams  # noqa: E402
from vlmcook.model.minicpmv import MiniCPMV  # noqa: E402

CONFIG = MiniCPMVConfig(
    vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2),
    resampler=ResamplerConfig(num_queries=64, embed_dim=512, num_heads=4, kv_dim=128),
    llm=LLMConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, bos_token_id=1, eos_token_id=2),
    torch_dtype="float32")


def _rss_reset() -> bool:
    try:  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _batch(lengths, seed=0):
    """Left-padded random-id prompts (ids 20..499: plain BPE pieces, no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.ones(len(lengths), T, dtype=torch.long)  # pad = <|endoftext|> = 1
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(20, 500, (n,), generator=g)
        mask[b, T - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _best(fn, repeat=3):
    return min((fn() for _ in range(repeat)), key=lambda r: r[0])


def text_section(engine: Engine, new_tokens: int) -> None:
    greedy = dict(temperature=0.0, stop_ids=())

    def prefill():
        g = engine.generate(_batch([1024]), SamplingParams(max_new_tokens=1, **greedy))[0]
        return (g.prefill_s,)

    def decode(lengths):
        gens = engine.generate(_batch(lengths), SamplingParams(max_new_tokens=new_tokens, **greedy))
        wall = max(g.decode_s for g in gens)
        return wall, sum(len(g.token_ids) - 1 for g in gens) / wall  # first token comes from the prefill

    engine.generate(_batch([16]), SamplingParams(max_new_tokens=2, **greedy))  # warm-up
    (p,) = _best(prefill)
    _, tps1 = _best(lambda: decode([128]))
    _, tps4 = _best(lambda: decode([128, 96, 64, 112]))
    print("\n## text (greedy, fp32 CPU)")
    print(f"{'measure':44s} {'value':>12s} {'ratio':>8s}")
    print(f"{'prefill, 1024-token prompt (tokens/s)':44s} {1024 / p:12.0f}")
    print(f"{'decode, batch 1 (tokens/s)':44s} {tps1:12.1f} {1.0:8.2f}")
    print(f"{'decode, batch 4 (tokens/s, all rows)':44s} {tps4:12.1f} {tps4 / tps1:8.2f}")


def ttft_section(chat: ChatModel) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    words = " ".join(["word"] * 120)

    def ttft(**kw):
        r = chat.chat(max_new_tokens=1, temperature=0, **kw)
        return r.timings.preprocess_s + r.timings.prefill_s, r.usage.prompt_tokens

    chat.chat("warm up", max_new_tokens=1)
    t_text, n_text = _best(lambda: ttft(messages=words))
    t_img, n_img = _best(lambda: ttft(messages="Describe.", images=[img]))
    print(f"{'time to first token, text (' + str(n_text) + ' tokens)':44s} {t_text * 1000:10.1f}ms")
    print(f"{'time to first token, 448x448 image (' + str(n_img) + ' tok)':44s} {t_img * 1000:10.1f}ms "
          f"{t_img / t_text:8.2f}")


def scrolling_video(path: Path, seconds=60, fps=10, w=320, h=240) -> Path:
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((np.sin(xx / 17.0) + np.cos(yy / 11.0)) * 60 + 128).astype(np.uint8)
    frames = (np.stack([y, np.roll(y, 40, 0), 255 - y], -1)
              for y in (np.roll(base, 3 * i, axis=1) for i in range(seconds * fps)))
    return write_video(path, frames, fps, options={"preset": "ultrafast"})


def video_section(chat: ChatModel, video: Path, fps: float) -> None:
    cfg = chat.model.config.llm
    rows = []
    for packing in (1, 3, 6):
        msgs = [{"role": "user", "content": [{"type": "video", "video": str(video)}, "What happens?"]}]
        base = _status_kb("VmRSS")
        have_hwm = _rss_reset()
        t0 = time.perf_counter()
        r = chat.chat(msgs, fps=fps, packing=packing, max_new_tokens=1, temperature=0)
        total = time.perf_counter() - t0
        peak = (_status_kb("VmHWM") - base) / 1024 if have_hwm else float("nan")
        kv_mb = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * (r.usage.prompt_tokens + 1)
        rows.append((packing, r.usage.visual_tokens, r.usage.prompt_tokens, r.timings.preprocess_s,
                     r.timings.vision_s, r.timings.prefill_s - r.timings.vision_s, r.timings.prefill_s, total, peak,
                     kv_mb / 2**20))
    print(f"\n## 1-minute 320x240 video at {fps:g} fps = {round(60 * fps)} frames, one request (prefill + 1 token)")
    print("video s = decode + preprocess; vision s = tower + resampler; LLM s = the LLM prefill; prefill = both")
    print(f"{'packing':>7s} {'visual tok':>10s} {'prompt':>7s} {'video s':>7s} {'vision s':>8s} {'LLM s':>6s} "
          f"{'prefill s':>9s} {'e2e s':>6s} {'peak RSS +MB':>12s} {'KV MB':>6s} | vs packing 1: "
          f"{'tokens':>6s} {'LLM':>5s} {'prefill':>7s} {'e2e':>5s} {'peak':>5s}")
    p1 = rows[0]
    for p, vt, pt, prep, vis, llm, pre, tot, peak, kv in rows:
        print(f"{p:7d} {vt:10d} {pt:7d} {prep:7.2f} {vis:8.2f} {llm:6.2f} {pre:9.2f} {tot:6.2f} {peak:12.0f} "
              f"{kv:6.1f} |{'':14s}{vt / p1[1]:6.2f} {llm / p1[5]:5.2f} {pre / p1[6]:7.2f} {tot / p1[7]:5.2f} "
              f"{peak / p1[8]:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--video-fps", type=float, default=1.0, help="video sampling rate (frames per second)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per row in the decode runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = MiniCPMV(CONFIG).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M params (LLM {sum(p.numel() for p in model.llm.parameters()) / 1e6:.1f}M), "
          f"fp32, {torch.get_num_threads()} threads")
    tok = Tokenizer.tiny()
    chat = ChatModel(model, tok)
    text_section(chat.engine, args.new_tokens)
    ttft_section(chat)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        video = scrolling_video(Path(d) / "minute.mp4")
        print(f"\n(wrote the test video in {time.perf_counter() - t0:.1f} s)")
        video_section(chat, video, args.video_fps)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
