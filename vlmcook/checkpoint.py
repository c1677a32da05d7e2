"""Checkpoints in the released layout: `model-0000i-of-0000N.safetensors` shards + `model.safetensors.index.json` +
`config.json` (+ tokenizer files when given).

Notable:
- Reading trusts nothing in the folder. Headers are checked at least as strictly as the safetensors library does
  (size limit, a UTF-8 JSON object, known dtypes, offsets contiguous from 0 that cover the data exactly, bytes =
  shape x dtype size); the index may name only plain files of the folder; names, shapes and dtypes must equal the
  model's. All of it before a weight is read, and in `load_model` before the model is allocated. Every failure is
  a `CheckpointError` naming the file and tensor; docs/reliability.md lists the checks.
- Weights are read straight into the model's own (preallocated, target-dtype) parameters with `readinto`: no second
  copy of the state dict and no mapping held open, so peak memory stays near one copy of the weights. A float tensor
  stored in another float dtype goes through one temporary of its own size; integer and bool tensors are never cast.
- Writing: a temporary folder beside the target, fsync'd (files, then folders), renamed into place, the parent
  fsync'd. Temporary folders of a crashed save (recognised by name, their process gone) go at the next save.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmcook.config import MiniCPMVConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_JSON_BYTES = 100_000_000  # an index or a trainer state (the released index is 100 KB)
# Every safetensors dtype torch has a type for; the format's other dtypes are refused as unknown.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
           "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_short = reprlib.Repr()  # values quoted from a file we do not trust, kept short in messages
_short.maxstring = _short.maxother = 120


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, malformed or does not match the model; the message names file and key."""


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


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """A device this machine has (default: CUDA when present, else CPU); ValueError naming what is missing (torch's
    own errors come late, as AssertionError / RuntimeError tracebacks)."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"{spec!r} is not a device (cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{spec}: no CUDA device here (torch {torch.__version__}"
                             f"{' is a CPU-only build' if torch.version.cuda is None else ''}); use cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{spec}: there are {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{spec}: MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{spec}: device type {dev.type!r} is not supported (cpu, cuda, mps)")
    return dev


# ---- reading ---------------------------------------------------------------------------------------------------
def member(folder: Path, name, what: str, hint: str = "") -> Path:
    """`folder/name` if it is a regular file of the folder: `name` must be a plain file name, and a symlink may lead
    only inside the folder (or, from a Hugging Face cache snapshot `<repo>/snapshots/<rev>/`, into `<repo>/blobs/`)."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise CheckpointError(f"{folder}: {what} name {_short.repr(name)} is not a plain file name in the checkpoint "
                              f"folder (absolute paths, '..' and sub-folders are refused)")
    path = folder / name
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise CheckpointError(f"{path}: {what} is not a regular file")
        real, root = path.resolve(strict=True), folder.resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} missing{hint}") from None
    except (OSError, RuntimeError) as e:  # permissions, symlink loops
        raise CheckpointError(f"{path}: {what} cannot be read ({e})") from None
    hf_blob = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if real.parent != root and not hf_blob:
        raise CheckpointError(f"{path}: {what} is a link to a file outside the checkpoint folder; refused")
    return path


def _unique(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {_short.repr(k)}")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, where: str):
    """Strict JSON: UTF-8, no duplicate keys (two readers could pick different ones), no NaN / Infinity."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{where}: not valid JSON ({_short.repr(str(e))[1:-1]})") from None


def read_json(path: Path):
    """A JSON file from a checkpoint folder (already checked by `member`), at most MAX_JSON_BYTES."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: larger than the {MAX_JSON_BYTES:,}-byte limit for a JSON file")
    return parse_json(raw, str(path))


def _u64(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64


def _entry(path: Path, name: str, h, base: int, size: int) -> TensorEntry:
    where = f"{path}: tensor {_short.repr(name)}"
    if not isinstance(h, dict) or set(h) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: a header entry has exactly dtype, shape and data_offsets, got "
                              f"{_short.repr(h)}")
    dtype = _DTYPES.get(h["dtype"]) if isinstance(h["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {_short.repr(h['dtype'])} (known: {', '.join(_DTYPES)})")
    shape, offsets = h["shape"], h["data_offsets"]
    numel = 1
    for s in shape if isinstance(shape, list) else [None]:
        numel = numel * s if _u64(s) else 2**64
        if numel >= 2**64:  # the library refuses a shape whose running product overflows 64 bits
            raise CheckpointError(f"{where}: shape must be a list of integers >= 0 whose product fits in 64 bits, "
                                  f"got {_short.repr(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_u64, offsets)) and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got "
                              f"{_short.repr(offsets)}")
    begin, end = offsets
    if base + end > size:
        raise CheckpointError(f"{path}: truncated: tensor {_short.repr(name)} needs bytes up to {base + end} but the "
                              f"file has {size}")
    if end - begin != numel * dtype.itemsize:
        raise CheckpointError(f"{where}: {end - begin} bytes for shape {_short.repr(shape)} {h['dtype']} (needs "
                              f"{numel * dtype.itemsize})")
    return TensorEntry(path, dtype, tuple(shape), base + begin, end - begin)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header and check it against the file (docs/reliability.md lists the checks)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes), no safetensors header")
            n = int.from_bytes(raw, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file (truncated or "
                                      f"not a safetensors file; the limit is {MAX_HEADER_BYTES:,} bytes)")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not text.startswith(b"{"):
        raise CheckpointError(f"{path}: the header does not start with '{{' (not a safetensors file)")
    header = parse_json(text, f"{path}: header")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {_short.repr(meta)}")
    base = 8 + n
    entries = {name: _entry(path, name, h, base, size) for name, h in header.items()}
    end = base  # the tensors, ordered by offsets, must tile the data section exactly (as the library requires)
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
        if e.offset != end:
            raise CheckpointError(f"{path}: tensor {_short.repr(name)} starts at data byte {e.offset - base} but the "
                                  f"tensors before it end at byte {end - base} (overlapping or gapped offsets)")
        end += e.nbytes
    if end != size:
        raise CheckpointError(f"{path}: {size - end} bytes after the last tensor (a safetensors file ends with its "
                              f"last tensor's data)")
    return entries


def scan_checkpoint(folder: str | Path) -> dict[str, TensorEntry]:
    """All tensors of a checkpoint folder (sharded with an index, or one model.safetensors), fully validated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not os.path.lexists(folder / INDEX_NAME):
        if os.path.lexists(folder / SINGLE_NAME):
            return read_header(member(folder, SINGLE_NAME, "weights file"))
        raise CheckpointError(f"{folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
    index_path = member(folder, INDEX_NAME, "index")
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: needs a 'weight_map' object mapping tensor names to shard file names")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    entries: dict[str, TensorEntry] = {}
    for shard in sorted(by_shard):
        names = by_shard[shard]
        path = member(folder, shard, "shard", f" (the index maps {_short.repr(names[0])} and {len(names) - 1} "
                                              f"other tensor(s) to it)")
        for name, entry in read_header(path).items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{path}: holds tensor {_short.repr(name)} that {INDEX_NAME} maps to "
                                      f"{_short.repr(weight_map.get(name))}")
            entries[name] = entry
    absent = [k for k in weight_map if k not in entries]
    if absent:
        raise CheckpointError(f"{folder / weight_map[absent[0]]}: tensor {_short.repr(absent[0])} is listed in "
                              f"{INDEX_NAME} but not stored in its shard ({len(absent)} such tensor(s))")
    return entries


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def check_against(model: torch.nn.Module, entries: dict[str, TensorEntry], folder: Path) -> None:
    """Names, shapes and dtypes of `entries` against `model` (which may live on the meta device)."""
    want = _model_tensors(model)
    missing = sorted(set(want) - set(entries))
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing[0]!r} ({len(missing)} missing in all: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''})")
    extra = sorted(set(entries) - set(want))
    if extra:
        raise CheckpointError(f"{entries[extra[0]].path}: unexpected tensor {_short.repr(extra[0])} for this config "
                              f"({len(extra)} unexpected in all)")
    for k, t in want.items():
        e = entries[k]
        if e.shape != tuple(t.shape):
            raise CheckpointError(f"{e.path}: tensor {k!r} has shape {list(e.shape)} but the config implies "
                                  f"{list(t.shape)} (config.json disagrees with the weights?)")
        if e.dtype != t.dtype and not (e.dtype.is_floating_point and t.dtype.is_floating_point):
            raise CheckpointError(f"{e.path}: tensor {k!r} is stored as {_NAMES[e.dtype]} but the model holds "
                                  f"{t.dtype}; integer and bool tensors are never converted")


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


def _read_file(path: Path, items: list[tuple[TensorEntry, torch.Tensor]]) -> None:
    try:
        with open(path, "rb") as f, torch.no_grad():
            for entry, out in sorted(items, key=lambda it: it[0].offset):  # sequential reads
                _read_into(f, entry, out)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def fill(model: torch.nn.Module, entries: dict[str, TensorEntry]) -> None:
    """Read every tensor of `model` (allocated, already `check_against` `entries`) from its file."""
    by_file: dict[Path, list] = {}
    for name, t in _model_tensors(model).items():
        by_file.setdefault(entries[name].path, []).append((entries[name], t.data))
    for path, items in by_file.items():
        _read_file(path, items)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (path checked by `member`), validated, in its stored dtype."""
    entries = read_header(path)
    out = {k: torch.empty(e.shape, dtype=e.dtype) for k, e in entries.items()}
    _read_file(path, [(entries[k], t) for k, t in out.items()])
    return out


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill `model`'s (already allocated) tensors from a checkpoint folder; validates fully first."""
    folder = Path(folder)
    entries = scan_checkpoint(folder)
    check_against(model, entries, folder)
    fill(model, entries)


def load_model(folder: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Build a MiniCPMV from `folder/config.json` and load its weights; peak memory ~ one copy of the weights."""
    from vlmcook.model.minicpmv import MiniCPMV

    folder = Path(folder)
    config = MiniCPMVConfig.from_file(folder)
    dtype = resolve_dtype(dtype, default=config.torch_dtype)
    with torch.device("meta"):  # no memory, no random init: every tensor comes from the checkpoint
        model = MiniCPMV(config).to(dtype)
    entries = scan_checkpoint(folder)
    check_against(model, entries, folder)  # before allocating: the stored shapes bound what we allocate
    model = model.to_empty(device=device)
    fill(model, entries)
    return model.eval()


# ---- writing ---------------------------------------------------------------------------------------------------
def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder bottom-up (a folder's entries are durable once it is)."""
    for d, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(d, name))
        fsync_path(Path(d), directory=True)


def commit_folder(tmp: Path, final: Path, old: Path) -> None:
    """Make the complete folder `tmp` durable and rename it to `final`, then make the rename durable. An existing
    `final` is first renamed to `old` and deleted only once the new folder is in place."""
    sync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        fsync_path(final.parent, directory=True)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
        fsync_path(final.parent, directory=True)


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # our own pid: an earlier save of ours that raised
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def remove_orphans(parent: Path, pattern: str) -> list[Path]:
    """Delete what a crashed save left in `parent`: entries whose name fully matches `pattern`; if the pattern has
    a group `pid`, only when that process no longer exists. Returns what was removed."""
    gone = []
    for p in parent.iterdir() if parent.is_dir() else []:
        m = re.fullmatch(pattern, p.name)
        if m and not ("pid" in m.groupdict() and _alive(int(m["pid"]))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def write_model(model, folder: Path, dtype: str | torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
                tokenizer=None) -> None:
    """config.json + sharded safetensors + index (+ tokenizer) into a new `folder`; not yet durable (see
    `commit_folder`)."""
    folder.mkdir(parents=True)
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
        save_file(part, str(folder / shard_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({k: shard_name for k in names})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    cfg = model.config.to_hf_dict()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)


def save_model(model, folder: str | Path, dtype: str | torch.dtype | None = None,
               max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> Path:
    """Write config.json + sharded safetensors + index in the released layout. The folder appears complete and
    durable or not at all: it is written beside the target (`.NAME.tmp-PID`), fsync'd and renamed into place."""
    folder = Path(folder)
    remove_orphans(folder.parent, rf"\.{re.escape(folder.name)}\.(tmp|old)-(?P<pid>\d+)")
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(model, tmp, dtype, max_shard_bytes, tokenizer)
    commit_folder(tmp, folder, folder.parent / f".{folder.name}.old-{os.getpid()}")
    return folder
