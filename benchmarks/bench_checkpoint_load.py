"""Peak memory of loading a multi-GB checkpoint in the released layout, ours vs the naive way.

A mid-size MiniCPM-V config (default ~5 GB of bf16 weights in 1 GB shards) is built once with random weights and
saved to a cache folder. Each loader then runs in a fresh process and reports its peak RSS (ru_maxrss) minus the
RSS of an interpreter that has only imported torch and vlmcook, so the ratio is "bytes of process memory per byte
of checkpoint".

    naive : build the model (random init) + safetensors.load_file every shard + load_state_dict   (~2-3x)
    ours  : vlmcook.checkpoint.load_model (meta init + readinto the parameters)                   (aim < 1.3x)

Usage: python benchmarks/bench_checkpoint_load.py [--gb 5] [--cache /tmp/vlmcook-bench-ckpt]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

# Peak RSS from VmHWM (per address space, reset by exec); ru_maxrss would inherit the parent's peak.
CHILD = r"""
import json, sys, torch
import vlmcook.checkpoint, vlmcook.model.minicpmv
def hwm_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm_kb()
folder, how = sys.argv[1], sys.argv[2]
if how == "ours":
    model = vlmcook.checkpoint.load_model(folder)
else:
    from safetensors.torch import load_file
    from vlmcook.config import MiniCPMVConfig
    cfg = MiniCPMVConfig.from_file(folder)
    model = vlmcook.model.minicpmv.MiniCPMV(cfg).to(torch.bfloat16)
    index = json.load(open(folder + "/model.safetensors.index.json"))
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(folder + "/" + shard))
    model.load_state_dict(state)
    del state
peak = hwm_kb()
print(json.dumps({"base_kb": base, "peak_kb": peak}))
"""


def make_checkpoint(folder: Path, gb: float) -> int:
    import torch

    from vlmcook.checkpoint import save_model
    from vlmcook.config import PRESETS
    from vlmcook.model.minicpmv import MiniCPMV

    v = PRESETS["v4_5"]
    # Keep the released vision tower and widths; choose the LLM depth that lands near the requested size.
    # Embeddings + lm_head + vision + resampler alone are ~3.5 GB in bf16, so sizes start there.
    per_layer = 192_946_432 * 2  # bytes of one bf16 Qwen3-8B layer
    layers = max(1, round((gb * 1e9 - 2 * 621_559_808 * 2 - 506_700_016 * 2) / per_layer))
    cfg = replace(v, llm=replace(v.llm, num_hidden_layers=layers))
    if not (folder / "model.safetensors.index.json").exists():
        with torch.device("meta"):
            model = MiniCPMV(cfg)
        model = model.to(torch.bfloat16).to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        save_model(model, folder, max_shard_bytes=1 << 30)
    return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=5.0, help="approximate checkpoint size in GB, >= 3.9 (default 5)")
    ap.add_argument("--cache", default="/tmp/vlmcook-bench-ckpt", help="where the generated checkpoint is kept")
    args = ap.parse_args()
    folder = Path(args.cache) / f"ckpt-{args.gb:g}gb"
    size = make_checkpoint(folder, args.gb)
    print(f"checkpoint: {folder} ({size / 1e9:.2f} GB of tensors, "
          f"{len(list(folder.glob('*.safetensors')))} shards)")
    print(f"{'loader':8s} {'peak RSS GB':>12s} {'over baseline GB':>17s} {'ratio to ckpt':>14s}")
    for how in ("naive", "ours"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), how], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = (r["peak_kb"] - r["base_kb"]) * 1024
        print(f"{how:8s} {r['peak_kb'] * 1024 / 1e9:12.2f} {extra / 1e9:17.2f} {extra / size:14.2f}x")


if __name__ == "__main__":
    main()
