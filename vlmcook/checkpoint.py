"""Checkpoints in the released layout: `model-0000i-of-0000N.safetensors` shards + `model.safetensors.index.json` +
`config.json` (+ tokenizer files when given).

Notable:
- Loading validates everything before touching a weight: every shard exists, every header parses, every tensor's
  bytes lie inside its file (a truncated download is caught here), the index agrees with the shard headers, the
  names equal the model's and the shapes equal what config.json implies. Each error names the file and the key.
- Weights are read straight into the model's own (preallocated, target-dtype) parameters with `readinto`: no second
  copy of the state dict and no mapping held open, so peak memory stays near one copy of the weights. A tensor whose
  stored dtype differs from the target goes through one temporary of its own size.
- We parse the safetensors header ourselves (8-byte little-endian length + JSON) to get those offsets; files are
  written with the `safetensors` library, so other tools read what we write.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmcook.config import MiniCPMVConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or does not match the model; the message names file and key."""


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def resolve_dtype(dtype: str | torch.dtype | None, default: str = "float32") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or default
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# ---- reading ---------------------------------------------------------------------------------------------------
def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header and check that every tensor's bytes are inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes), no safetensors header")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file (truncated or "
                                  f"not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    entries, base = {}, 8 + n
    for name, h in header.items():
        try:
            dtype = _DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            begin, end = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {h!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                                  f"{h['dtype']}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes up to {base + end} but the file "
                                  f"has {size}")
        entries[name] = TensorEntry(path, dtype, shape, base + begin, end - begin)
    return entries


def scan_checkpoint(folder: str | Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint folder (sharded with an index, or one model.safetensors), fully validated."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        if (folder / SINGLE_NAME).exists():
            return read_header(folder / SINGLE_NAME)
        raise CheckpointError(f"{folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index ({e!r})") from None
    entries: dict[str, TensorEntry] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.exists():
            first = next(k for k, v in weight_map.items() if v == shard)
            raise CheckpointError(f"{path}: shard missing (the index maps {first!r} and others to it)")
        for name, entry in read_header(path).items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{path}: holds tensor {name!r} that {INDEX_NAME} maps to "
                                      f"{weight_map.get(name)!r}")
            entries[name] = entry
    absent = [k for k in weight_map if k not in entries]
    if absent:
        raise CheckpointError(f"{folder / weight_map[absent[0]]}: tensor {absent[0]!r} is listed in {INDEX_NAME} "
                              f"but not stored in its shard ({len(absent)} such tensor(s))")
    return entries


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def check_against(model: torch.nn.Module, entries: dict[str, TensorEntry], folder: Path) -> None:
    want = {k: tuple(v.shape) for k, v in _model_tensors(model).items()}
    missing = sorted(set(want) - set(entries))
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing[0]!r} ({len(missing)} missing in all: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''})")
    extra = sorted(set(entries) - set(want))
    if extra:
        raise CheckpointError(f"{entries[extra[0]].path}: unexpected tensor {extra[0]!r} for this config "
                              f"({len(extra)} unexpected in all)")
    for k, shape in want.items():
        if entries[k].shape != shape:
            raise CheckpointError(f"{entries[k].path}: tensor {k!r} has shape {list(entries[k].shape)} but the "
                                  f"config implies {list(shape)} (config.json disagrees with the weights?)")


def _read_into(f, entry: TensorEntry, out: torch.Tensor) -> None:
    f.seek(entry.offset)
    direct = out.dtype == entry.dtype and out.device.type == "cpu" and out.is_contiguous()
    buf = out if direct else torch.empty(entry.shape, dtype=entry.dtype)
    view = memoryview(buf.view(-1).view(torch.uint8).numpy())
    got = 0
    while got < entry.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{entry.path}: unexpected end of file while reading a tensor at byte "
                                  f"{entry.offset + got}")
        got += n
    if not direct:
        out.copy_(buf)


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill `model`'s (already allocated) tensors from a checkpoint folder; validates fully first."""
    folder = Path(folder)
    entries = scan_checkpoint(folder)
    check_against(model, entries, folder)
    targets = _model_tensors(model)
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(entries[name].path, []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with open(path, "rb") as f:
                for name in sorted(names, key=lambda k: entries[k].offset):  # sequential reads
                    _read_into(f, entries[name], targets[name].data)


def load_model(folder: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Build a MiniCPMV from `folder/config.json` and load its weights; peak memory ~ one copy of the weights."""
    from vlmcook.model.minicpmv import MiniCPMV

    folder = Path(folder)
    config = MiniCPMVConfig.from_file(folder)
    dtype = resolve_dtype(dtype, default=config.torch_dtype)
    with torch.device("meta"):  # no memory, no random init: every tensor comes from the checkpoint
        model = MiniCPMV(config).to(dtype)
    model = model.to_empty(device=device)
    load_weights(model, folder)
    return model.eval()


# ---- writing ---------------------------------------------------------------------------------------------------
def save_model(model, folder: str | Path, dtype: str | torch.dtype | None = None,
               max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> Path:
    """Write config.json + sharded safetensors + index in the released layout. The folder appears atomically: it is
    written beside the target and renamed into place, so a crash never leaves a half-written checkpoint there."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = resolve_dtype(dtype, default=model.config.torch_dtype) if dtype is not None else None
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * (dtype or t.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # Convert one shard at a time so saving never holds a second full copy of the model.
        part = {k: tensors[k].to(device="cpu", dtype=dtype or tensors[k].dtype).contiguous() for k in names}
        save_file(part, str(tmp / shard_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({k: shard_name for k in names})
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2))
    cfg = model.config.to_hf_dict()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save(tmp)
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder
