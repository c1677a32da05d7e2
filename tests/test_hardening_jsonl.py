"""SFT and RL JSONL readers under random input (issue 16): random bytes, random JSON values and random record-shaped
objects always give a sample (a task) or a DataError (ValueError) naming file:line, never another exception; plus
the explicit rows of docs/reliability.md "SFT and RL JSONL": line limits, byte-order marks, NaN, deep nesting, a
bad line counted once however often a mixture draws it, over-length samples skipped at the model's context by
default, the all-skipped mixture error.

Oracle for "names file:line": the line number is recomputed from the file's bytes (the n-th non-blank line)."""

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from media import write_video

from vlmcook.config import MiniCPMVConfig
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.rl.cli import load_tasks
from vlmcook.train import data as D
from vlmcook.train.data import DataError, JsonlRecords, JsonlSource, ListRecords, Mixture, RecordSource

CFG = MiniCPMVConfig.from_name("tiny")
TOK = Tokenizer.tiny()
DIR = Path(tempfile.mkdtemp(prefix="vlmcook-jsonl-"))
Image.new("RGB", (30, 20), (200, 10, 10)).save(DIR / "ok.png")
(DIR / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
write_video(DIR / "clip.mp4", [Image.new("RGB", (32, 24), (k * 20, 0, 0)) for k in range(6)], fps=6)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _nonblank_lines(raw: bytes) -> list[int]:
    """1-based numbers of the non-blank lines (a leading UTF-8 BOM is not content)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return [n for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]


def _write(raw: bytes) -> Path:
    path = Path(tempfile.mkstemp(suffix=".jsonl", dir=DIR)[1])
    path.write_bytes(raw)
    return path


def _check_sft(raw: bytes) -> None:
    path = _write(raw)
    lines = _nonblank_lines(raw)
    src = JsonlSource(path, TOK, CFG)
    strict = JsonlSource(path, TOK, CFG, strict=True)
    assert len(src) == len(lines)
    for i, n in enumerate(lines):
        sample = src[i]
        try:
            again = strict[i]
        except DataError as e:
            assert sample is None and str(e).startswith(f"{path}:{n}: ") and e.where == f"{path}:{n}"
            continue
        assert sample is not None and again is not None
        assert sample["input_ids"].shape[1] <= CFG.llm.max_position_embeddings
    assert src.skips.total == sum(src[i] is None for i in range(len(src)))  # drawn again: not counted again


def _check_rl(raw: bytes) -> None:
    path = _write(raw)
    lines = _nonblank_lines(raw)
    try:
        tasks = load_tasks(path)
    except ValueError as e:
        assert re.match(rf"{re.escape(str(path))}(:({'|'.join(map(str, lines))}))?: ", str(e)) \
            or str(e).startswith(f"--data {path}: no prompts"), str(e)
        return
    assert len(tasks) == len(lines)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=12)
IMAGE = st.sampled_from(["ok.png", "ok.png", "bad.png", "missing.png", "", "/etc", str(DIR / "ok.png"), 5, None, [],
                         {}, "../ok.png", "ok.png\x00"])
VIDEO = st.sampled_from([{"path": "clip.mp4"}, {"path": "clip.mp4", "fps": 2, "packing": 2}, {"path": "ok.png"},
                         {"path": "missing.mp4"}, {"path": 5}, {"path": "ok.png", "fps": "x"},
                         {"path": "ok.png", "fps": 0}, {"path": "ok.png", "bogus": 1}, {"path": None}, "ok.png", None,
                         {}, [], {"path": "ok.png", "packing": 7}])
TEXT = st.sampled_from(["hi", "", "<|im_end|>", "a" * 50, "中文", "Q", "<think>r</think>a", "(<image>./</image>)",
                        "(<video>./</video>)", "x" * 5000, "\x00", "(<image>", "</image>)"])
ROLE = st.sampled_from(["user", "user", "assistant", "system", "tool", "bot", 3, None])


def _mostly(good, bad):
    """`good` three times in four, else one of the `bad` strategies."""
    return st.integers(0, 3).flatmap(lambda k: good if k else st.one_of(*bad))


@st.composite
def records(draw, rl: bool) -> dict:
    """A record that is mostly right (markers and media lists of matching lengths, a plausible turn order), with
    each part wrong one time in four (a role, a key, a type, a file, a count)."""
    n_img, n_vid = draw(st.integers(0, 2)), draw(st.integers(0, 1))
    marks = "\n".join(["(<image>./</image>)"] * n_img + ["(<video>./</video>)"] * n_vid)
    user = {"role": "user", "content": marks + "\n" + draw(TEXT)}
    bad_turn = st.fixed_dictionaries({"role": ROLE, "content": TEXT | st.integers() | st.lists(TEXT)},
                                     optional={"reasoning_content": TEXT | st.none(), "name": TEXT})
    turns = draw(_mostly(st.just([]), [st.lists(bad_turn, min_size=1, max_size=2)]))
    msgs = [*turns, user] if rl else [*turns, user, {"role": "assistant", "content": draw(TEXT)}]
    rec = {"messages": draw(_mostly(st.just(msgs), [st.just(msgs[:-1]), st.just(msgs[::-1]), JSON]))}
    rec["images"] = draw(_mostly(st.just(["ok.png"] * n_img), [st.lists(IMAGE, min_size=max(0, n_img - 1),
                                                                         max_size=n_img + 1)]))
    rec["videos"] = draw(st.lists(VIDEO, min_size=n_vid, max_size=n_vid))
    extra = {"id": JSON, "meta": JSON, "image": IMAGE}
    if rl:
        rec["answer"] = draw(_mostly(st.sampled_from(["2", 2, 2.5, ["a", "b"]]),
                                     [st.sampled_from([[], {}, None, True, float("inf")])]))
        extra |= {"verifier": st.sampled_from(["number", "choice", "anls", "prob", "bogus", 1]),
                  "tolerance": st.sampled_from([0, 0.5, -1, "x", True, 1e308, None])}
    for key, strategy in extra.items():
        if draw(st.integers(0, 5)) == 0:
            rec[key] = draw(strategy)
    return rec


def _jsonl(values) -> bytes:
    return b"\n".join(json.dumps(v).encode() for v in values) + b"\n"


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(raw):
    _check_sft(raw)
    _check_rl(raw)


@SETTINGS
@given(st.lists(JSON, min_size=1, max_size=4))
def test_random_json_values(values):
    _check_sft(_jsonl(values))
    _check_rl(_jsonl(values))


@SETTINGS
@given(st.lists(records(rl=False), min_size=1, max_size=3))
def test_random_sft_records(recs):
    _check_sft(_jsonl(recs))


@SETTINGS
@given(st.lists(records(rl=True), min_size=1, max_size=3))
def test_random_rl_records(recs):
    _check_rl(_jsonl(recs))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([b"", b" ", b"\r", b"\n", b"{}", b"\xef\xbb\xbf", b"x", b"\t\n"]), max_size=12)
       .map(b"".join), st.integers(1, 5))
def test_line_index_any_block_size(raw, block):
    """The block-wise line scan finds the same lines, offsets and numbers as splitting the whole file."""
    path = _write(raw)
    got = list(D._lines(path, block=block))
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    want, pos = [], len(raw) - len(body)
    for n, line in enumerate(body.split(b"\n"), 1):
        if line.strip():
            want.append((pos, len(line), n))
        pos += len(line) + 1
    assert got == want


# ---- explicit rows ---------------------------------------------------------------------------------------------
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def _src(tmp_path, lines: list[bytes], **kw) -> tuple[JsonlSource, Path]:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return JsonlSource(path, TOK, CFG, **kw), path


@pytest.mark.parametrize("line, reason, says", [
    (b"\xff\xfe{}", "bad_json", "not UTF-8"),
    (b'{"messages": NaN}', "bad_json", "NaN is not JSON"),
    (b"[" * 100_000, "bad_json", "nested too deeply"),
    (b'{"a": 1} {"b": 2}', "bad_json", "Extra data"),
    (b'"just a string"', "bad_record", "must be an object"),
])
def test_bad_lines_name_file_line_and_reason(tmp_path, line, reason, says):
    src, path = _src(tmp_path, [json.dumps(GOOD).encode(), line])
    assert src[0] is not None and src[1] is None
    (got_reason, where, message), = src.skips.entries
    assert (got_reason, where) == (reason, f"{path}:2") and says in message
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {reason}: ")):
        JsonlSource(path, TOK, CFG, strict=True)[1]


def test_a_byte_order_mark_and_crlf_are_accepted(tmp_path):
    src, _ = _src(tmp_path, [b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r", json.dumps(GOOD).encode() + b"\r"])
    assert len(src) == 2 and src[0] is not None and src[1] is not None and not src.skips.total


def test_a_line_over_the_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_LINE_BYTES", 100)
    big = json.dumps({**GOOD, "meta": "x" * 200}).encode()
    src, path = _src(tmp_path, [big, json.dumps(GOOD).encode()])
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert src[0] is None and src[1] is not None
    assert len(opened) == 1  # only the good line was read
    assert src.skips.entries[0][:2] == ("too_large", f"{path}:1") and "more than 100" in src.skips.entries[0][2]


def test_a_redrawn_bad_line_is_counted_once(tmp_path):
    src, path = _src(tmp_path, [b"{bad", json.dumps(GOOD).encode()])
    mix = Mixture([(src, 1.0)], seed=0)
    for i in range(200):
        assert mix[i]["input_ids"].shape[1] > 0
    assert src.skips.total == 1 and src.skips.counts == {"bad_json": 1} and src.skips.redrawn > 10
    assert f"skipped 1 records (bad_json: 1; drawn again {src.skips.redrawn} times)" in src.skips.summary()


def test_a_bad_record_is_processed_once(tmp_path, monkeypatch):
    rec = {"images": ["missing.png"], "messages": [{"role": "user", "content": "(<image>./</image>)"},
                                                   {"role": "assistant", "content": "x"}]}
    src, _ = _src(tmp_path, [json.dumps(rec).encode()])
    calls = []
    real = src.processor.__call__
    monkeypatch.setattr(src, "processor", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert [src[0] for _ in range(5)] == [None] * 5 and len(calls) == 1


def test_over_length_is_skipped_at_the_model_context_by_default():
    long = {"messages": [{"role": "user", "content": "word " * 2500}, {"role": "assistant", "content": "ok"}]}
    src = RecordSource(ListRecords([long, GOOD], "mem"), TOK, CFG)
    assert src.max_length == CFG.llm.max_position_embeddings == 4096
    assert src[0] is None and src[1] is not None
    (reason, where, message), = src.skips.entries
    assert (reason, where) == ("too_long", "mem[0]") and "> max_length=4096" in message
    with pytest.raises(ValueError, match="max_length"):
        RecordSource(ListRecords([GOOD]), TOK, CFG, max_length=0)


def test_over_length_is_refused_before_decoding(monkeypatch):
    """The length comes from image headers: an over-length record's pixels are never decoded."""
    from vlmcook.data import processor as P

    rec = {"images": [str(DIR / "ok.png")],
           "messages": [{"role": "user", "content": "(<image>./</image>)" + "word " * 50},
                        {"role": "assistant", "content": "ok"}]}
    monkeypatch.setattr(P, "load_image", lambda *a, **k: pytest.fail("decoded"))
    src = RecordSource(ListRecords([rec]), TOK, CFG, max_length=40)
    assert src[0] is None and src.skips.counts == {"too_long": 1}


def test_mixture_all_skipped_names_the_files(tmp_path):
    src, path = _src(tmp_path, [b"{bad", b"[1]"])
    with pytest.raises(DataError, match=rf"all skipped records \({re.escape(str(path))}: skipped 2 records"):
        Mixture([(src, 1.0)], seed=0)[0]


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0, "1", None])
def test_mixture_weights_must_be_finite_numbers(tmp_path, weight):
    src, path = _src(tmp_path, [json.dumps(GOOD).encode()])
    with pytest.raises(ValueError, match=f"finite weights.*{re.escape(str(path))}"):
        Mixture([(src, weight)], seed=0)


def test_jsonl_records_of_a_missing_file():
    with pytest.raises(FileNotFoundError, match="no such JSONL file"):
        JsonlRecords(DIR / "nothing.jsonl")


def test_skips_in_a_background_worker_are_printed(tmp_path, capfd):
    """in_background's DataLoader worker holds its own copy of each source's SkipLog; a skip there is printed."""
    from vlmcook.train.data import in_background, token_batches

    src, path = _src(tmp_path, [b"{bad", json.dumps(GOOD).encode()])
    batches = in_background(token_batches(Mixture([(src, 1.0)], seed=0), 64, 64, TOK.pad_id))(0)
    for _ in range(2):
        next(batches)
    del batches
    err = capfd.readouterr().err
    assert err.count(f"skipped (data worker): {path}:1: bad_json") == 1
    assert src.skips.total == 0  # the caller's copy saw nothing: the printed line is the report
