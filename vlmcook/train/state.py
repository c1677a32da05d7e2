"""Training checkpoints: `out/step-N/` = the model in the released layout (config.json + safetensors shards + index)
+ `trainer_state.pt`; `out/latest` names the newest complete one.

Notable:
- Crash safety: the step folder is written under a temporary name and renamed into place only when complete; then
  `latest` is rewritten through a temp file + `os.replace` (atomic on POSIX). A crash at any point leaves `latest`
  naming a complete folder (or absent).
- `trainer_state.pt` holds the optimizer (FQN-keyed, via torch.distributed.checkpoint.state_dict, so it loads
  whatever the wrapping: plain, DDP or FSDP2), the number of finished steps, every rank's python / numpy / torch RNG
  states, the data position (micro-batches consumed per rank: the data side is a pure function of it), the
  TrainConfig and the model config. It is loaded with `weights_only=False` (numpy RNG state): only load your own.
- Resume refuses another model config or a TrainConfig that changes the math (lr, schedule, batch, stage, ...),
  naming the first differing field; bookkeeping fields (out dir, logging, save cadence) may change.
- With LoRA the released-layout folder holds the *unmerged* base (exact resume) and `adapter_model.safetensors`
  + `adapter_config.json` hold the adapters; with `lora_save_merged` a `merged/` sub-folder holds W + (alpha/r) B A
  under the released keys, ready for `load_model`.
- Under FSDP2 the full (unsharded) state is gathered to rank 0's CPU: simple, but the 8B model's fp32 optimizer
  state (~64 GB) must fit in host RAM there.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from vlmcook.checkpoint import load_weights, save_model
from vlmcook.train.common import Dist

STATE_NAME = "trainer_state.pt"
ADAPTER_NAME = "adapter_model.safetensors"
LATEST = "latest"
# TrainConfig fields that may differ on resume: they do not change what the next step computes.
RESUME_FREE = {"out_dir", "save_every", "log_every", "resume", "grad_checkpointing", "dist", "lora_save_merged"}


class ResumeError(ValueError):
    """The checkpoint cannot continue this run; the message names the mismatch."""


class _Weights:
    """What `save_model` needs from a model: `.config` and `.state_dict()`."""

    def __init__(self, config, tensors: dict[str, torch.Tensor]):
        self.config, self._tensors = config, tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._tensors


def _options(dist: Dist) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True) if dist.enabled else StateDictOptions()


def _is_lora(k: str) -> bool:
    return k.endswith((".lora_A", ".lora_B"))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _merged(tensors: dict[str, torch.Tensor], lora_cfg: dict) -> dict[str, torch.Tensor]:
    """Released-key tensors with every adapter folded in: W + (alpha / r) * B @ A."""
    out = {k: v for k, v in tensors.items() if not _is_lora(k)}
    scale = lora_cfg["alpha"] / lora_cfg["r"]
    for k in tensors:
        if k.endswith(".lora_A"):
            mod = k[: -len(".lora_A")]
            w = out[mod + ".weight"]
            delta = tensors[mod + ".lora_B"].float() @ tensors[k].float() * scale
            out[mod + ".weight"] = (w.float() + delta).to(w.dtype)
    return out


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_cfg, data_position: int, dist: Dist, model_config, tokenizer=None) -> Path | None:
    """Collective (every rank calls it). `step` = optimizer steps finished. Returns the folder on rank 0."""
    tensors = get_model_state_dict(model, options=_options(dist))
    optim = get_optimizer_state_dict(model, optimizer, options=_options(dist))
    rngs = [None] * dist.world_size
    if dist.enabled:
        tdist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    folder = None
    if dist.is_main:
        folder = _write(Path(out_dir), step, tensors, optim, rngs, train_cfg, data_position, dist, model_config,
                        tokenizer)
    if dist.enabled:
        tdist.barrier()
    return folder


def _write(out: Path, step, tensors, optim, rngs, train_cfg, data_position, dist, model_config, tokenizer) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    name = f"step-{step}"
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    base = {k: v for k, v in tensors.items() if not _is_lora(k)}
    save_model(_Weights(model_config, base), tmp, tokenizer=tokenizer)
    lora_cfg = {"r": train_cfg.lora_r, "alpha": train_cfg.lora_alpha, "dropout": train_cfg.lora_dropout,
                "targets": train_cfg.lora_targets}
    if len(base) < len(tensors):
        save_file({k: v.contiguous() for k, v in tensors.items() if _is_lora(k)}, str(tmp / ADAPTER_NAME))
        (tmp / "adapter_config.json").write_text(json.dumps(lora_cfg, indent=2))
        if train_cfg.lora_save_merged:
            save_model(_Weights(model_config, _merged(tensors, lora_cfg)), tmp / "merged", tokenizer=tokenizer)
    state = {"step": step, "data_position": data_position, "optimizer": optim, "rng": rngs,
             "world_size": dist.world_size, "train_config": asdict(train_cfg),
             "model_config": model_config.to_dict()}
    torch.save(state, tmp / STATE_NAME)
    final = out / name
    if final.exists():  # re-saving the same step (e.g. after a resume): swap, never delete first
        old = out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    # `latest` moves only now that the folder is complete.
    _fsync_write(out / f".{LATEST}.tmp", name.encode())
    os.replace(out / f".{LATEST}.tmp", out / LATEST)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder `out/latest` names, or None if there is no checkpoint yet."""
    path = Path(out_dir) / LATEST
    if not path.exists():
        return None
    folder = Path(out_dir) / path.read_text().strip()
    if not (folder / STATE_NAME).exists():
        raise ResumeError(f"{path} names {folder.name!r} but {folder / STATE_NAME} does not exist")
    return folder


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def read_checkpoint(folder: str | Path, train_cfg, model_config, dist: Dist) -> dict:
    """Load `trainer_state.pt` and check it can continue this run (same model config, same math)."""
    folder = Path(folder)
    state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=False)
    saved, now = _flat(state["model_config"]), _flat(model_config.to_dict())
    for k in sorted(set(saved) | set(now)):
        if saved.get(k) != now.get(k):
            raise ResumeError(f"{folder}: checkpoint was trained with model config {k}={saved.get(k)!r}, this run "
                              f"has {now.get(k)!r}")
    saved, now = _flat(state["train_config"]), _flat(asdict(train_cfg))
    for k in sorted(set(saved) | set(now)):
        if k not in RESUME_FREE and saved.get(k) != now.get(k):
            raise ResumeError(f"{folder}: checkpoint was trained with TrainConfig.{k}={saved.get(k)!r}, this run "
                              f"has {now.get(k)!r} (only {sorted(RESUME_FREE)} may change on resume)")
    if state["world_size"] != dist.world_size:
        raise ResumeError(f"{folder}: checkpoint was written by {state['world_size']} processes, this run has "
                          f"{dist.world_size} (the per-rank data position would not line up)")
    return state


def load_model_state(folder: str | Path, model: nn.Module) -> None:
    """Weights (and adapters) of a step folder into an unwrapped model."""
    folder = Path(folder)
    if not (folder / ADAPTER_NAME).exists():
        load_weights(model, folder)
        return
    tensors = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(str(shard)))
    tensors.update(load_file(str(folder / ADAPTER_NAME)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ResumeError(f"{folder}: LoRA checkpoint does not fit the model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]} (different LoRA targets or rank?)")


def load_trainer_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> None:
    """Optimizer + this rank's RNG, after the model is wrapped and the optimizer built."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"], options=_options(dist))
    _set_rng_state(state["rng"][dist.rank])
