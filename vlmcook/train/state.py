"""Training checkpoints: `out/step-N/` = the model in the released layout (config.json + safetensors shards + index)
+ the trainer state; `out/latest` names the newest complete one.

Notable:
- No pickle: `trainer_state.safetensors` holds the optimizer tensors (FQN-keyed, via
  torch.distributed.checkpoint.state_dict, so they load whatever the wrapping: plain, DDP or FSDP2) and every rank's
  torch RNG state; `trainer_state.json` the step, the data position (micro-batches consumed per rank: the data side is
  a pure function of it), the optimizer's param groups, the python / numpy RNG states, the TrainConfig and the model
  config. Everything is validated before use, so resuming from someone else's folder runs none of its code. The old
  `trainer_state.pt` (a pickle) is refused unread.
- Crash safety: the step folder is written under a temporary name, fsync'd, renamed into place, its parent fsync'd;
  only then is `latest` rewritten (fsync'd temp file + `os.replace` + folder fsync). A crash or power cut at any point
  leaves `latest` naming a complete folder (or absent). A crashed save's leftovers (`.step-N.tmp`, `.step-N.old`,
  `.latest.tmp`) are removed by the next save or resume.
- Resume refuses another model config or a TrainConfig that changes the math (lr, schedule, batch, stage, ...),
  naming the first differing field; bookkeeping fields (out dir, logging, save cadence) may change.
- With LoRA the released-layout folder holds the *unmerged* base (exact resume), `adapter_model.safetensors` the
  adapters; with `lora_save_merged` a `merged/` sub-folder holds W + (alpha/r) B A under the released keys.
- Under FSDP2 the full state is gathered to rank 0's CPU: the 8B model's fp32 optimizer state (~64 GB) must fit there.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from vlmcook.checkpoint import (CheckpointError, check_against, commit_folder, fill, fsync_path, member, read_header,
                                read_json, read_tensors, remove_orphans, scan_checkpoint, write_model)
from vlmcook.train.common import Dist

STATE_NAME = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
FORMAT = "vlmcook-trainer-state-1"
ADAPTER_NAME = "adapter_model.safetensors"
LATEST = "latest"
# What a crashed save leaves in out_dir (and `..step-N.tmp.tmp-PID`, the leftover of earlier versions).
ORPHANS = r"\.(step-\d+\.(tmp|old)|latest\.tmp|\.step-\d+\.tmp\.(tmp|old)-\d+)"
# TrainConfig fields that may differ on resume: they do not change what the next step computes.
RESUME_FREE = {"out_dir", "save_every", "log_every", "resume", "grad_checkpointing", "dist", "lora_save_merged"}


class ResumeError(ValueError):
    """The checkpoint cannot continue this run; the message names the mismatch."""


class _Weights:
    """What `write_model` needs from a model: `.config` and `.state_dict()`."""

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


# ---- saving ----------------------------------------------------------------------------------------------------
def check_out_dir(out_dir: str | Path) -> None:
    """Create `out_dir` or say why it cannot hold checkpoints (called before training, not at the first save)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"out_dir {out}: cannot create it ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"out_dir {out}: not writable")


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
    remove_orphans(out, ORPHANS)
    name = f"step-{step}"
    tmp = out / f".{name}.tmp"
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    base = {k: v for k, v in tensors.items() if not _is_lora(k)}
    write_model(_Weights(model_config, base), tmp, tokenizer=tokenizer)
    lora_cfg = {"r": train_cfg.lora_r, "alpha": train_cfg.lora_alpha, "dropout": train_cfg.lora_dropout,
                "targets": train_cfg.lora_targets}
    if len(base) < len(tensors):
        save_file({k: v.contiguous() for k, v in tensors.items() if _is_lora(k)}, str(tmp / ADAPTER_NAME))
        (tmp / "adapter_config.json").write_text(json.dumps(lora_cfg, indent=2))
        if train_cfg.lora_save_merged:
            write_model(_Weights(model_config, _merged(tensors, lora_cfg)), tmp / "merged", tokenizer=tokenizer)
    _write_state(tmp, {"format": FORMAT, "step": step, "data_position": data_position,
                       "world_size": dist.world_size, "train_config": asdict(train_cfg),
                       "model_config": model_config.to_dict()}, optim, rngs)
    final = out / name
    commit_folder(tmp, final, out / f".{name}.old")  # re-saving a step (after a resume) swaps, never deletes first
    # `latest` moves only now that the folder is complete and on disk.
    pointer = out / f".{LATEST}.tmp"
    with open(pointer, "wb") as f:
        f.write(name.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, out / LATEST)
    fsync_path(out, directory=True)
    return final


def _write_state(folder: Path, meta: dict, optim: dict, rngs: list[dict]) -> None:
    """Tensors to trainer_state.safetensors (`optimizer.<fqn>.<key>`, `rng.<rank>.torch`, `rng.<rank>.cuda.<i>`),
    everything else to trainer_state.json."""
    tensors, scalars = {}, {}
    for fqn, st in optim["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{fqn}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(fqn, {})[k] = v
    rng_json = []
    for rank, r in enumerate(rngs):
        tensors[f"rng.{rank}.torch"] = r["torch"]
        for i, t in enumerate(r.get("cuda", [])):
            tensors[f"rng.{rank}.cuda.{i}"] = t
        version, internal, gauss = r["python"]
        _, key, pos, has_gauss, cached = r["numpy"]
        rng_json.append({"python": [version, list(internal), gauss],
                         "numpy": {"key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached}})
    meta = {**meta, "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars}, "rng": rng_json}
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_NAME).write_text(json.dumps(meta, indent=1, allow_nan=False))


# ---- resuming --------------------------------------------------------------------------------------------------
def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder `out/latest` names, or None if there is no checkpoint yet. Removes a crashed save's leftovers."""
    out = Path(out_dir)
    remove_orphans(out, ORPHANS)
    if not os.path.lexists(out / LATEST):
        return None
    path = member(out, LATEST, "checkpoint pointer")
    with open(path, "rb") as f:
        name = f.read(64).decode("ascii", "replace").strip()
    if not re.fullmatch(r"step-\d+", name):
        raise CheckpointError(f"{path}: names {name!r}, not a step folder (step-N) of {out}")
    folder = out / name
    _state_file(folder, STATE_NAME)
    return folder


def _state_file(folder: Path, name: str) -> Path:
    if not os.path.lexists(folder / STATE_NAME) and os.path.lexists(folder / LEGACY_STATE):
        raise CheckpointError(f"{folder / LEGACY_STATE}: a trainer state in the old pickle format, which is never "
                              f"loaded (a pickle can run code); its weights load as a model: start a new run from "
                              f"them with --init {folder}")
    return member(folder, name, "trainer state")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def _field(d: dict, key: str, kind: type, where: str, low: int | None = None):
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool or low is not None and v < low:
        want = f"an integer >= {low}" if low is not None else f"a JSON {kind.__name__}"
        raise CheckpointError(f"{where}: field {key!r} must be {want}, got {str(v)[:80]!r}")
    return v


def read_checkpoint(folder: str | Path, train_cfg, model_config, dist: Dist) -> dict:
    """Read and validate the trainer state of a step folder and check it can continue this run (same model config,
    same math, same world size)."""
    folder = Path(folder)
    path = _state_file(folder, STATE_NAME)
    meta = read_json(path)
    where = str(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a trainer state of this version (format {FORMAT!r})")
    for key, kind in (("train_config", dict), ("model_config", dict), ("optimizer", dict), ("rng", list)):
        _field(meta, key, kind, where)
    step, position = _field(meta, "step", int, where, 0), _field(meta, "data_position", int, where, 0)
    world = _field(meta, "world_size", int, where, 1)
    saved, now = _flat(meta["model_config"]), _flat(model_config.to_dict())
    for k in sorted(set(saved) | set(now)):
        if saved.get(k) != now.get(k):
            raise ResumeError(f"{folder}: checkpoint was trained with model config {k}={saved.get(k)!r}, this run "
                              f"has {now.get(k)!r}")
    saved, now = _flat(meta["train_config"]), _flat(asdict(train_cfg))
    for k in sorted(set(saved) | set(now)):
        if k not in RESUME_FREE and saved.get(k) != now.get(k):
            raise ResumeError(f"{folder}: checkpoint was trained with TrainConfig.{k}={saved.get(k)!r}, this run "
                              f"has {now.get(k)!r} (only {sorted(RESUME_FREE)} may change on resume)")
    if world != dist.world_size:
        raise ResumeError(f"{folder}: checkpoint was written by {world} processes, this run has "
                          f"{dist.world_size} (the per-rank data position would not line up)")
    tensors = read_tensors(_state_file(folder, STATE_TENSORS))
    rngs = _rngs(meta["rng"], tensors, world, where)  # each takes its tensors out of `tensors`
    optimizer = _optimizer(meta["optimizer"], tensors, where)
    if tensors:
        raise CheckpointError(f"{folder / STATE_TENSORS}: unexpected tensor {sorted(tensors)[0]!r}")
    return {"step": step, "data_position": position, "world_size": world, "train_config": meta["train_config"],
            "model_config": meta["model_config"], "optimizer": optimizer, "rng": rngs, "folder": str(folder)}


def _rngs(saved: list, tensors: dict[str, torch.Tensor], world: int, where: str) -> list[dict]:
    """Per-rank RNG states, each tried on a scratch generator of its library, which rejects what it cannot take."""
    if len(saved) != world:
        raise CheckpointError(f"{where}: {len(saved)} RNG states for {world} processes")
    out = []
    for rank, r in enumerate(saved):
        try:
            version, internal, gauss = r["python"]
            n = r["numpy"]
            state = {"python": (version, tuple(internal), gauss),
                     "numpy": ("MT19937", np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                               n["cached_gaussian"]),
                     "torch": tensors.pop(f"rng.{rank}.torch"),
                     "cuda": [tensors.pop(f"rng.{rank}.cuda.{i}") for i in range(len(tensors))
                              if f"rng.{rank}.cuda.{i}" in tensors]}
            random.Random().setstate(state["python"])
            np.random.RandomState().set_state(state["numpy"])
            torch.Generator().set_state(state["torch"])
            if any(t.dtype != torch.uint8 or t.dim() != 1 for t in state["cuda"]):
                raise ValueError("a CUDA RNG state is not a 1-D uint8 tensor")
        except (KeyError, TypeError, ValueError, OverflowError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{where}: RNG state of rank {rank} is malformed ({str(e)[:200]})") from None
        if not state["cuda"]:
            del state["cuda"]
        out.append(state)
    return out


def _optimizer(saved: dict, tensors: dict[str, torch.Tensor], where: str) -> dict:
    """The optimizer state dict (FQN-keyed) back from its JSON part and its tensors."""
    groups, scalars = saved.get("param_groups"), saved.get("scalars")
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             and all(isinstance(p, str) for p in g["params"]) for g in groups)):
        raise CheckpointError(f"{where}: optimizer.param_groups must be a list of objects with a 'params' list of "
                              f"parameter names")
    if not (isinstance(scalars, dict) and all(isinstance(v, dict) for v in scalars.values())
            and all(isinstance(x, (int, float, type(None))) for v in scalars.values() for x in v.values())):
        raise CheckpointError(f"{where}: optimizer.scalars must map parameter names to objects of numbers")
    # JSON has no tuples: hyperparameters such as betas come back as lists.
    groups = [{k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in g.items()} for g in groups]
    state: dict[str, dict] = {fqn: dict(v) for fqn, v in scalars.items()}
    for name in [k for k in tensors if k.startswith("optimizer.")]:
        if not tensors[name].dtype.is_floating_point:  # the optimizer would cast it to the parameter's dtype
            raise CheckpointError(f"{where}: optimizer tensor {name!r} is {tensors[name].dtype}, not floating point")
        fqn, _, key = name[len("optimizer."):].rpartition(".")
        state.setdefault(fqn, {})[key] = tensors.pop(name)
    known = {p for g in groups for p in g["params"]}
    stray = sorted(set(state) - known)
    if stray:
        raise CheckpointError(f"{where}: optimizer state for {stray[0]!r}, which no param group lists")
    return {"state": state, "param_groups": groups}


def load_model_state(folder: str | Path, model: nn.Module) -> None:
    """Weights (and adapters) of a step folder into an unwrapped model, validated like any checkpoint."""
    folder = Path(folder)
    entries = scan_checkpoint(folder)
    if os.path.lexists(folder / ADAPTER_NAME):
        adapters = read_header(member(folder, ADAPTER_NAME, "adapter file"))
        both = sorted(entries.keys() & adapters.keys())
        if both:
            raise CheckpointError(f"{folder}: tensor {both[0]!r} is both in the model shards and in {ADAPTER_NAME}")
        entries.update(adapters)
    check_against(model, entries, folder)
    fill(model, entries)


def _groups(optimizer: torch.optim.Optimizer) -> list[tuple[list[int], dict]]:
    # Tuples as lists: loading under FSDP2 turns the betas tuple into a list.
    return [([id(p) for p in g["params"]], {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()
                                            if k not in ("params", "lr")}) for g in optimizer.param_groups]


def load_trainer_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist) -> None:
    """Optimizer + this rank's RNG, after the model is wrapped and the optimizer built. The loaded optimizer must
    keep this run's parameter groups and hyperparameters, and hold state shaped like its parameters."""
    where = f"{state.get('folder', 'checkpoint')}/{STATE_NAME}"
    before = _groups(optimizer)
    try:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"], options=_options(dist))
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{where}: the optimizer state does not fit this run's optimizer ({str(e)[:200]})") \
            from None
    for i, ((ids, hyper), (ids_now, hyper_now)) in enumerate(zip(before, _groups(optimizer))):
        diff = sorted(k for k in hyper.keys() | hyper_now.keys() if hyper.get(k) != hyper_now.get(k))
        if ids != ids_now or diff or len(before) != len(optimizer.param_groups):
            what = f"hyperparameter {diff[0]}={hyper_now.get(diff[0])!r} (this run: {hyper.get(diff[0])!r})" \
                if diff else "other parameters"
            raise CheckpointError(f"{where}: optimizer param group {i} has {what}")
    held = 0
    for p, st in optimizer.state.items():
        held += 1
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and (not v.dtype.is_floating_point or tuple(v.shape) not in
                                                ((), tuple(p.shape))):
                raise CheckpointError(f"{where}: optimizer state {k!r} is {v.dtype} {list(v.shape)} for a parameter "
                                      f"of shape {list(p.shape)}")
    if held != len(state["optimizer"]["state"]):
        raise CheckpointError(f"{where}: holds optimizer state for {len(state['optimizer']['state'])} parameters, "
                              f"this run's optimizer took {held}")
    _set_rng_state(state["rng"][dist.rank])
