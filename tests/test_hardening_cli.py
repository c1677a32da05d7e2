"""The command line's error boundary (issue 16): every command answers bad input with one line on stderr and exit
code 2, never a traceback; a bug is one line and exit code 1 (VLMCOOK_DEBUG=1 re-raises it); a reader that leaves
the pipe early is not an error message. Cases are the ones that used to print tracebacks (--device cuda on a CPU
build, --port 99999, --log-level bogus, an all-bad JSONL, invalid UTF-8 on the chat REPL's stdin) and the classes
of docs/reliability.md "Command line"."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmcook import cli
from vlmcook.checkpoint import save_model
from vlmcook.config import PRESETS
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.model.minicpmv import MiniCPMV


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_hard")
    torch.manual_seed(0)
    save_model(MiniCPMV(PRESETS["tiny"]), root / "model", tokenizer=Tokenizer.tiny())
    return root / "model"


def run(argv, capsys, stdin: str | bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        raw = stdin.encode() if isinstance(stdin, str) else stdin
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8",
                                                           errors="surrogateescape"))
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, want_code=2):
    assert code == want_code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("vlmcook chat: type", "sft:"))]
    assert len(lines) == 1, err
    return lines[0]


CPU_ONLY = not torch.cuda.is_available()


@pytest.mark.parametrize("device, says", [
    pytest.param("cuda", "no CUDA device here", marks=pytest.mark.skipif(not CPU_ONLY, reason="has CUDA")),
    pytest.param("cuda:3", "no CUDA device here", marks=pytest.mark.skipif(not CPU_ONLY, reason="has CUDA")),
    ("foo", "'foo' is not a device"),
    ("cuda:-1", "is not a device"),
    ("meta", "device type 'meta' is not supported"),
])
def test_device_checked_before_loading(model_dir, capsys, device, says):
    for cmd in (["chat", "--model", str(model_dir), "hi"], ["serve", "--model", str(model_dir)],
                ["eval", "--task", "mcq", "--data", "x", "--out", "y"]):
        line = one_line_error(*run([*cmd, "--device", device], capsys)[::2])
        assert says in line and line.startswith(f"vlmcook {cmd[0]}: error: argument --device")


@pytest.mark.parametrize("argv, says", [
    (["serve", "--port", "99999"], "'99999' is not a port number (1..65535)"),
    (["serve", "--port", "-1"], "is not a port number"),
    (["serve", "--log-level", "bogus"], "invalid choice: 'bogus'"),
    (["chat", "--fps", "abc", "hi"], "argument --fps: invalid float value: 'abc'"),
    (["train", "--stage", "nope"], "invalid choice: 'nope'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_flags_are_one_line_with_a_help_pointer(capsys, argv, says):
    line = one_line_error(*run(argv, capsys)[::2])
    assert says in line and line.endswith("--help)")


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("vlmcook ")


@pytest.mark.parametrize("argv, says", [
    (["--fps", "2", "hi"], "--fps: video sampling flags need a --video"),
    (["--packing", "3", "--max-frames", "4", "hi"], "--max-frames, --packing: video sampling flags need a --video"),
    (["--fps", "nan", "--video", "{img}", "hi"], "--fps must be a number in (0, 10]"),
    (["--packing", "9", "--video", "{img}", "hi"], "--packing must be an integer in 1..6"),
])
def test_video_flags_checked_before_loading(model_dir, capsys, monkeypatch, argv, says, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    monkeypatch.setattr(cli, "_load_chat_model", lambda args: pytest.fail("loaded the model"))
    argv = [a.replace("{img}", str(img)) for a in argv]
    assert says in one_line_error(*run(["chat", "--model", str(model_dir), *argv], capsys)[::2])


def _garble(model_dir: Path, tmp_path: Path, name: str, data: bytes | None) -> Path:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    if data is None:
        (bad / name).unlink()
    else:
        (bad / name).write_bytes(data)
    return bad


@pytest.mark.parametrize("name, data, says", [
    ("config.json", b"{garbage", "config.json: not valid JSON"),
    ("config.json", b'{"vocab_size": 1e999}', "config"),
    ("tokenizer.json", b"garbage", "tokenizer.json: cannot read tokenizer.json"),
    ("model-00001-of-00001.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "safetensors"),
    ("model-00001-of-00001.safetensors", None, "shard missing"),
    ("model.safetensors.index.json", b"[]", "index"),
])
def test_a_garbled_model_folder(model_dir, tmp_path, capsys, name, data, says):
    bad = _garble(model_dir, tmp_path, name, data)
    commands = [["chat", "--model", str(bad), "hi"]] + [["info", str(bad)]] * (name != "tokenizer.json")
    for argv in commands:  # info reads no tokenizer
        assert says in one_line_error(*run(argv, capsys)[::2])


def test_missing_model_folder(tmp_path, capsys):
    line = one_line_error(*run(["chat", "--model", str(tmp_path / "none"), "hi"], capsys)[::2])
    assert "no checkpoint there" in line


def test_train_on_an_all_bad_jsonl(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"\xff\xfe\n[1, 2]\n")
    line = one_line_error(*run(["train", "--stage", "sft", "--preset", "tiny", "--data", str(data), "--out",
                                str(tmp_path / "o"), "--steps", "1", "--batch-size", "1"], capsys)[::2])
    assert "all skipped records" in line and f"{data}:1: bad_json: not UTF-8" in line and f"{data}:2" in line


def test_rl_prompt_errors_name_the_line(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"answer": "2", "messages": [{"role": "user", "content": "1+1?"}]}) + "\n"
                    + json.dumps({"answer": "2", "messages": ["hi"]}) + "\n")
    line = one_line_error(*run(["rl", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "o")],
                               capsys)[::2])
    assert f"{data}:2: 'messages' must be a non-empty list ending with a user turn" in line


def test_rl_prompt_over_the_context_is_found_before_training(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "long", "answer": "2",
                                "messages": [{"role": "user", "content": "word " * 5000}]}) + "\n")
    line = one_line_error(*run(["rl", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "o"),
                                "--steps", "1"], capsys)[::2])
    assert line.startswith("vlmcook rl: error: prompt long: the prompt is") and "4095 tokens" in line


def test_repl_survives_bad_lines(model_dir, capsys, monkeypatch, tmp_path):
    (tmp_path / "x.txt").write_text("not an image")
    stdin = b"\xff\xfe\n/image " + str(tmp_path / "x.txt").encode() + b"\nwhat is it\n" + "word " .encode() * 5000 \
        + b"\nhello\n"
    code, out, err = run(["chat", "--model", str(model_dir), "--max-new-tokens", "2", "--temperature", "0"], capsys,
                         stdin, monkeypatch)
    assert code == 0 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 3 and "not valid Unicode" in errors[0] and "not an image" in errors[1]
    assert "/reset starts a new conversation" in errors[2]
    assert len(out.splitlines()) == 1  # "hello" was answered


def test_bugs_are_one_line_and_debug_shows_them(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("an invariant\nbroke")
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(fn=boom)
    line = one_line_error(*run(["info", "x"], capsys)[::2], want_code=1)
    assert line == ("vlmcook info: internal error: RuntimeError: an invariant broke (this is a bug; rerun with "
                    "VLMCOOK_DEBUG=1 for the traceback and report it)")
    monkeypatch.setenv("VLMCOOK_DEBUG", "1")
    with pytest.raises(RuntimeError, match="invariant"):
        cli.main(["info", "x"])


@pytest.mark.parametrize("exc, code, says", [
    (PermissionError(13, "Permission denied", "/out"), 2, "error: [Errno 13] Permission denied: '/out'"),
    (ModuleNotFoundError("No module named 'av'"), 2, "error: No module named 'av'"),
    (MemoryError(), 1, "error: out of memory (MemoryError)"),
    (KeyboardInterrupt(), 130, None),
])
def test_environment_errors(capsys, monkeypatch, exc, code, says):
    def fail(args):
        raise exc
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(fn=fail)
    got, _, err = run(["info", "x"], capsys)
    if says is None:
        assert got == code and err == ""
    else:
        assert says in one_line_error(got, err, want_code=code)


def test_a_closed_stdout_pipe_is_not_an_error(model_dir):
    p = subprocess.Popen([sys.executable, "-m", "vlmcook.cli", "info", str(model_dir)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader leaves before the command writes
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and err == b""


@pytest.mark.parametrize("device, says", [
    pytest.param("cuda", "no CUDA device here", marks=pytest.mark.skipif(not CPU_ONLY, reason="has CUDA")),
    ("foo", "'foo' is not a device"),
    ("meta", "device type 'meta' is not supported"),
])
def test_python_api_device_checked_before_loading(model_dir, device, says):
    """ChatModel.load checks the device as the CLI does: a ValueError naming it, not torch's AssertionError from
    deep inside the load."""
    from vlmcook.infer.api import ChatModel

    with pytest.raises(ValueError, match=says):
        ChatModel.load(model_dir, device=device)


def _sft_file(tmp_path) -> str:
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    return str(data)


def test_train_out_that_cannot_hold_checkpoints_fails_before_training(tmp_path, capsys):
    """--out under a file used to train every step and fail at the save (the run lost); now it fails first."""
    (tmp_path / "a_file").write_text("x")
    code, out, err = run(["train", "--stage", "sft", "--preset", "tiny", "--data", _sft_file(tmp_path), "--out",
                          str(tmp_path / "a_file" / "x"), "--steps", "50"], capsys)
    line = one_line_error(code, err)
    assert f"out_dir {tmp_path / 'a_file' / 'x'}: cannot create it" in line and "sft:" not in err


@pytest.mark.parametrize("flag", ["--pack", "--max-length"])
def test_train_token_counts_must_be_positive(tmp_path, capsys, flag):
    """--pack 0 used to mean 'no packing' silently; a count of tokens must be >= 1."""
    line = one_line_error(*run(["train", "--stage", "sft", "--preset", "tiny", "--data", _sft_file(tmp_path),
                                "--out", str(tmp_path / "o"), flag, "0"], capsys)[::2])
    assert f"{flag[2:].replace('-', '_')}=0: must be a number of tokens >= 1" in line
