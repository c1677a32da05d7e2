"""The checkpoint reader against bad files: every malformed header, offset, dtype, index and path gives a
CheckpointError naming the file (and tensor), never another exception, and it never accepts what the safetensors
library refuses (the library is the oracle: whatever we load, it loads to the same bytes)."""
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vlmcook.checkpoint import (INDEX_NAME, MAX_HEADER_BYTES, CheckpointError, load_model, read_header,
                                read_tensors, save_model, scan_checkpoint)
from vlmcook.config import PRESETS
from vlmcook.model.minicpmv import MiniCPMV

SETTINGS = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def st_file(header, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if n is None else n).to_bytes(8, "little") + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8), **extra) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


def library_refuses(raw: bytes) -> bool:
    try:
        st_load(raw)
    except (SafetensorError, KeyError):  # the library raises KeyError for dtypes it cannot map to torch
        return True
    return False


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---- explicit boundaries: one bad-input class each -------------------------------------------------------------
DUP = b'{"a":' + json.dumps(entry()).encode() + b',"a":' + json.dumps(entry()).encode() + b"}"
CASES = {  # name: (file bytes, message, does the safetensors library refuse it too)
    "too short for a header": (b"\x05\0\0", "truncated \\(3 bytes\\)", True),
    "header length beyond the file": (st_file({"a": entry()}, b"\0" * 8, n=10_000), "header length 10000", True),
    "header length over the limit": (st_file({}, n=MAX_HEADER_BYTES + 1), "header length 100000001", True),
    "header not JSON": (st_file(b"{not json}"), "not valid JSON", True),
    "header not UTF-8": (st_file(b'{"\xff": 1}'), "not valid JSON", True),
    "header a JSON list": (st_file(b"[]"), "does not start with", True),
    "header nested too deep": (st_file(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "not valid JSON", True),
    "header with NaN": (st_file(b'{"__metadata__": {"x": NaN}}'), "NaN is not a JSON number", True),
    "metadata not strings": (st_file({"__metadata__": {"x": 1}}), "__metadata__ must map strings", True),
    "unknown dtype": (st_file({"a": entry(dtype="F4", offsets=(0, 1))}, b"\0"), "tensor 'a': unknown dtype 'F4'",
                      True),
    "shape not integers": (st_file({"a": entry(shape=[2.0])}, b"\0" * 8), "tensor 'a': shape must be", True),
    "negative dimension": (st_file({"a": entry(shape=[-2])}, b"\0" * 8), "tensor 'a': shape must be", True),
    "bool dimension": (st_file({"a": entry(shape=[True, 2])}, b"\0" * 8), "tensor 'a': shape must be", True),
    "shape product overflows": (st_file({"a": entry(shape=[2**40, 2**40, 0], offsets=(0, 0))}),
                                "product fits in 64 bits", True),
    "offsets reversed": (st_file({"a": entry(offsets=(8, 0))}, b"\0" * 8), "data_offsets must be", True),
    "offsets beyond the file": (st_file({"a": entry(offsets=(0, 8))}, b"\0" * 4), "truncated: tensor 'a'", True),
    "bytes not shape x dtype": (st_file({"a": entry(offsets=(0, 4))}, b"\0" * 4), "4 bytes for shape \\[2\\] F32",
                                True),
    "overlapping offsets": (st_file({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12),
                            "tensor 'b' starts at data byte 4 .* byte 8", True),
    "gap before a tensor": (st_file({"a": entry(offsets=(4, 12))}, b"\0" * 12), "starts at data byte 4", True),
    "bytes after the last tensor": (st_file({"a": entry()}, b"\0" * 9), "1 bytes after the last tensor", True),
    # Stricter than the library, which takes the last duplicate, ignores unknown keys and leading spaces:
    "duplicate tensor name": (st_file(DUP, b"\0" * 8), "duplicate key 'a'", False),
    "unknown key in an entry": (st_file({"a": entry(foo=1)}, b"\0" * 8), "exactly dtype, shape and data_offsets",
                                False),
    "header not starting with {": (st_file(b' {"a":' + json.dumps(entry()).encode() + b"}", b"\0" * 8),
                                   "does not start with", False),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_header_is_named(case, tmp_path):
    raw, message, library_too = CASES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: .*{message}"):
        read_header(path)
    assert library_refuses(raw) == library_too


def test_valid_edge_cases_load(tmp_path):
    path = tmp_path / "ok.safetensors"
    # No tensors, a metadata-only header, zero-size and 0-dim tensors, padding spaces after the JSON.
    for raw in (st_file({}), st_file({"__metadata__": None}), st_file({"e": entry(shape=[0, 3], offsets=(0, 0))}),
                st_file(json.dumps({"s": entry(shape=[], offsets=(0, 4))}).encode() + b"   ", b"\0\0\x80\x3f")):
        path.write_bytes(raw)
        got = read_tensors(path)
        want = st_load(raw)
        assert got.keys() == want.keys() and all(_bytes(got[k]) == _bytes(want[k]) for k in got)


def test_integer_and_bool_tensors_keep_their_dtype(tmp_path):
    path = tmp_path / "ints.safetensors"
    tensors = {"i": torch.tensor([-(2**62), 3], dtype=torch.int64), "b": torch.tensor([True, False, True]),
               "u": torch.arange(4, dtype=torch.uint8)}
    path.write_bytes(st_save(tensors))
    got = read_tensors(path)
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())


# ---- checkpoint folders ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = MiniCPMV(PRESETS["tiny"]).eval()
    return model, save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", max_shard_bytes=200_000)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _shards(folder) -> list:
    return sorted(folder.glob("model-*.safetensors"))


def _index(folder) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def _set_index(folder, index) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/model.safetensors", "..", "",
                                  "a\\b.safetensors"])
def test_index_cannot_name_a_file_outside_the_folder(saved, tmp_path, name):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    first = _shards(dst)[0]
    (tmp_path / "outside.safetensors").write_bytes(first.read_bytes())
    index = _index(dst)
    index["weight_map"] = {k: name if v == first.name else v for k, v in index["weight_map"].items()}
    _set_index(dst, index)
    with pytest.raises(CheckpointError, match="not a plain file name in the checkpoint folder"):
        load_model(dst)


def test_symlinks_may_not_leave_the_folder(saved, tmp_path):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    shard = _shards(dst)[1]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard is a link to a file outside"):
        load_model(dst)
    shard.unlink()
    (dst / "renamed.safetensors").write_bytes(outside.read_bytes())
    shard.symlink_to("renamed.safetensors")  # a link that stays inside the folder is fine
    load_model(dst)


def test_hugging_face_cache_snapshot_loads(saved, tmp_path):
    """The hub cache keeps files in <repo>/blobs/ and links them from <repo>/snapshots/<rev>/."""
    model, folder = saved
    repo = tmp_path / "models--openbmb--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    again = load_model(snap)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_fifo_shard_is_refused_without_blocking(saved, tmp_path):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    shard = _shards(dst)[2]
    shard.unlink()
    os.mkfifo(shard)  # opening it for reading would wait for a writer forever
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard is not a regular file"):
        scan_checkpoint(dst)


@pytest.mark.parametrize("index,message", [
    ({"metadata": {}}, "needs a 'weight_map' object"),
    ({"weight_map": []}, "needs a 'weight_map' object"),
    ({"weight_map": {"llm.model.norm.weight": 3}}, "needs a 'weight_map' object"),
    ([1, 2], "needs a 'weight_map' object"),
])
def test_malformed_index_is_named(saved, tmp_path, index, message):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    _set_index(dst, index)
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: {message}"):
        load_model(dst)


def test_index_and_shards_must_agree(saved, tmp_path):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    index = _index(dst)
    wm = index["weight_map"]
    wm["resampler.query"], wm["resampler.proj"] = wm["resampler.proj"], wm["resampler.query"]
    if wm["resampler.query"] != wm["resampler.proj"]:
        _set_index(dst, index)
        with pytest.raises(CheckpointError, match="holds tensor 'resampler\\.(query|proj)' that .* maps to"):
            load_model(dst)
    wm["resampler.query"] = wm["resampler.proj"] = "model-00000-of-00009.safetensors"
    _set_index(dst, index)
    with pytest.raises(CheckpointError, match="model-00000-of-00009.safetensors: shard missing \\(the index maps"):
        load_model(dst)


def test_extra_tensor_and_integer_tensor_are_refused(saved, tmp_path):
    model, folder = saved
    dst = _copy(folder, tmp_path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    extra = dict(sd, **{"llm.model.layers.9.mlp.up_proj.weight": torch.zeros(2)})
    shutil.rmtree(dst)
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    (dst / "model.safetensors").write_bytes(st_save(extra))
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'llm.model.layers.9.mlp.up_proj"):
        load_model(dst)
    for dtype, name in ((torch.int64, "I64"), (torch.bool, "BOOL"), (torch.int32, "I32")):
        ints = dict(sd, **{"resampler.query": sd["resampler.query"].to(dtype)})
        (dst / "model.safetensors").write_bytes(st_save(ints))
        with pytest.raises(CheckpointError, match=f"'resampler.query' is stored as {name} but the model holds "
                                                  f"torch.float32; integer and bool tensors are never converted"):
            load_model(dst)
    (dst / "model.safetensors").write_bytes(st_save({k: v.double() for k, v in sd.items()}))
    again = load_model(dst)  # float to float is a dtype choice, not a silent cast
    assert torch.equal(again.resampler.query, sd["resampler.query"].double().float())


# ---- property-based: random and mutated files ------------------------------------------------------------------
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@st.composite
def valid_files(draw) -> bytes:
    names = draw(st.lists(st.text(min_size=0, max_size=6), max_size=4, unique=True))
    tensors = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        n = torch.Size(shape).numel() * dtype.itemsize
        raw = draw(st.binary(min_size=n, max_size=n))
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        tensors[name] = t.view(dtype).reshape(shape) if dtype != torch.bool else (t % 2).bool().reshape(shape)
    # (safetensors 0.8 writes invalid JSON for no tensors with an empty metadata dict, so metadata is None or filled)
    return st_save(tensors, metadata=draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                                      min_size=1, max_size=2)))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@st.composite
def mutated_files(draw) -> bytes:
    raw = bytearray(draw(valid_files()))
    n = int.from_bytes(raw[:8], "little")
    kind = draw(st.sampled_from(["byte", "truncate", "append", "length", "entry", "header"]))
    if kind == "byte" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif kind == "append":
        raw += draw(st.binary(min_size=1, max_size=16))
    elif kind == "length":
        raw[:8] = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 16), n + 16)).to_bytes(8, "little")
    else:  # rewrite the header JSON with one field replaced by an arbitrary JSON value
        header = json.loads(raw[8: 8 + n])
        if kind == "entry" and [k for k in header if k != "__metadata__"]:
            name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            header[name][field] = draw(json_values | st.sampled_from(["F32", "U16", "F8_E4M3", "Q4"])
                                       | st.lists(st.integers(-1, 40), max_size=3))
        else:
            header[draw(st.text(max_size=6))] = draw(json_values)
        text = json.dumps(header).encode()
        raw = bytearray(st_file(text, bytes(raw[8 + n:])))
    return bytes(raw)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("prop") / "t.safetensors"


def _check_file(raw: bytes, path) -> bool:
    """Ours either refuses with a CheckpointError or returns exactly what the library returns."""
    path.write_bytes(raw)
    try:
        got = read_tensors(path)
    except CheckpointError:
        return False
    want = st_load(raw)  # raises if the library refuses what we accepted
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and _bytes(got[k]) == _bytes(want[k])
               for k in got)
    return True


@SETTINGS
@given(raw=valid_files())
def test_valid_files_load_exactly(raw, scratch):
    assert _check_file(raw, scratch)


@settings(SETTINGS, max_examples=300)
@given(raw=mutated_files())
def test_mutated_files_load_correctly_or_raise_checkpoint_error(raw, scratch):
    _check_file(raw, scratch)


@settings(SETTINGS, max_examples=200)
@given(raw=st.binary(max_size=64) | st.builds(st_file, st.binary(max_size=40), st.binary(max_size=16)))
def test_random_bytes_never_crash_the_reader(raw, scratch):
    _check_file(raw, scratch)


@st.composite
def mutated_indexes(draw, weight_map: dict):
    wm = dict(weight_map)
    shards = sorted(set(wm.values()))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "move", "add", "rename_shard", "value", "top"]))
        key = draw(st.sampled_from(sorted(wm))) if wm else "x"
        if op == "drop":
            wm.pop(key, None)
        elif op == "move":
            wm[key] = draw(st.sampled_from(shards))
        elif op == "add":
            wm[draw(st.text(max_size=10))] = draw(st.sampled_from(shards))
        elif op == "rename_shard":
            wm[key] = draw(st.sampled_from(["../x", "/etc/passwd", "", ".", "config.json", INDEX_NAME, "nope",
                                            "sub/x", "model.safetensors"]) | st.text(max_size=12))
        elif op == "value":
            wm[key] = draw(json_values)
        else:
            return draw(json_values | st.fixed_dictionaries({"weight_map": json_values}))
    return {"metadata": {"total_size": 0}, "weight_map": wm}


@pytest.fixture(scope="module")
def folder_copy(saved, tmp_path_factory):
    _, folder = saved
    dst = tmp_path_factory.mktemp("idx") / "copy"
    shutil.copytree(folder, dst)
    return dst


@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_mutated_index_loads_correctly_or_raises_checkpoint_error(saved, folder_copy, data):
    model, folder = saved
    index = data.draw(mutated_indexes(_index(folder)["weight_map"]))
    _set_index(folder_copy, index)
    try:
        again = load_model(folder_copy)
    except CheckpointError:
        return
    # Accepted: then it is the same model (e.g. only the order of the index changed).
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
