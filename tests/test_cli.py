"""`vlmcook chat` (one-shot, interactive, --stats, --think, --stream, images, video) and `vlmcook info`, run through
`cli.main` on a tiny random-weight checkpoint saved in the released layout.

Oracles: `ChatModel.chat` called directly with the same conversation (the CLI must print exactly its answer and
keep multi-turn history the way the API expects), the processor's own token count, visual-token counts and video
package spans derived by hand (tiny config: 8 tokens per view or package; a 1 s, 10 fps clip sampled at 5 fps
takes frames 1, 3, 5, 7, 9 at 0.1 s steps), and parameter counts summed from the model's own tensors."""

import io
import sys

import pytest
import torch
from PIL import Image

from media import write_video
from vlmcook import cli
from vlmcook.checkpoint import save_model
from vlmcook.config import PRESETS
from vlmcook.data.processor import Processor
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.infer.api import ChatModel
from vlmcook.model.minicpmv import MiniCPMV

Q = PRESETS["tiny"].query_num


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = MiniCPMV(PRESETS["tiny"])
    save_model(model, root / "model", tokenizer=Tokenizer.tiny())
    Image.new("RGB", (90, 70), (10, 200, 30)).save(root / "green.png")
    return root, sum(p.numel() for p in model.state_dict().values())


@pytest.fixture(scope="module")
def api(ckpt):
    return ChatModel.load(ckpt[0] / "model")


def run(argv, capsys, monkeypatch=None, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def chat_args(ckpt, *extra):
    return ["chat", "--model", str(ckpt[0] / "model"), "--temperature", "0", "--max-new-tokens", "6", *extra]


def test_one_shot_prints_the_api_answer(ckpt, api, capsys):
    code, out, err = run(chat_args(ckpt, "Hello there"), capsys)
    assert code == 0
    expect = api.chat("Hello there", temperature=0, max_new_tokens=6)
    assert out == expect.answer + "\n"
    assert "thinking" not in err


def test_stream_prints_the_same_answer(ckpt, api, capsys):
    code, out, _ = run(chat_args(ckpt, "--stream", "--seed", "5", "--temperature", "0.9", "Tell me"), capsys)
    assert code == 0
    assert out == api.chat("Tell me", temperature=0.9, seed=5, max_new_tokens=6).answer + "\n"


def test_stats_with_image(ckpt, api, capsys):
    img = str(ckpt[0] / "green.png")
    code, out, err = run(chat_args(ckpt, "--image", img, "--stats", "What colour?"), capsys)
    assert code == 0
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, "What colour?"]}]
    assert out == api.chat(msgs, temperature=0, max_new_tokens=6).answer + "\n"
    count = Processor(Tokenizer.tiny(), PRESETS["tiny"]).count_tokens(msgs)
    assert count.visual_tokens == Q  # 90x70 -> one view
    assert f"prompt {count.total} tokens ({count.total - Q} text + {Q} visual)" in err
    assert "image" in err and "1 views -> 1 packages" in err
    assert "prefill" in err and "decode" in err and "tok/s" in err


def write_mp4(path, n=10, fps=10) -> None:
    """1 s at 10 fps, 64x48."""
    pytest.importorskip("av")
    write_video(path, [Image.new("RGB", (64, 48), (25 * i, 80, 160)) for i in range(n)], fps, codec="mpeg4")


def test_stats_video_packages_and_spans(ckpt, capsys, tmp_path):
    write_mp4(tmp_path / "clip.mp4")
    code, _, err = run(chat_args(ckpt, "--video", str(tmp_path / "clip.mp4"), "--fps", "5", "--packing", "2",
                                 "--stats", "What happens?"), capsys)
    assert code == 0
    assert f"5 views -> 3 packages -> {3 * Q} visual tokens" in err
    assert "0.1-0.3s, 0.5-0.7s, 0.9-0.9s" in err


def test_think_shows_reasoning_apart(ckpt, api, capsys):
    code, out, err = run(chat_args(ckpt, "--think", "--think-budget", "2", "Why?"), capsys)
    assert code == 0
    expect = api.chat("Why?", thinking=True, think_budget=2, temperature=0, max_new_tokens=6)
    assert out == expect.answer + "\n"
    assert f"thinking: {expect.reasoning}" in err
    code, out, err = run(chat_args(ckpt, "--think", "--think-budget", "2", "--stream", "Why?"), capsys)
    assert out == expect.answer + "\n" and "thinking: " + expect.reasoning in err


def test_interactive_multi_turn_reset_quit(ckpt, api, capsys, monkeypatch):
    stdin = "first question\nsecond one\n/reset\nfirst question\n/bogus\n/quit\nnever asked\n"
    code, out, err = run(chat_args(ckpt), capsys, monkeypatch, stdin)
    assert code == 0
    kw = dict(temperature=0, max_new_tokens=6)
    a1 = api.chat("first question", **kw)
    hist = [{"role": "user", "content": "first question"},
            {"role": "assistant", "content": a1.answer, "reasoning_content": a1.reasoning}]
    a2 = api.chat(hist + [{"role": "user", "content": "second one"}], **kw)
    assert out.split("\n")[:3] == [a1.answer, a2.answer, a1.answer]  # /reset: the third turn starts afresh
    assert out.count("\n") == 3  # /quit stopped before "never asked"
    assert "unknown command '/bogus'" in err and "(new conversation)" in err


def test_interactive_with_image_keeps_it_in_history(ckpt, api, capsys, monkeypatch):
    img = str(ckpt[0] / "green.png")
    code, out, _ = run(chat_args(ckpt, "--image", img), capsys, monkeypatch, "what?\nand now?\n")
    assert code == 0
    kw = dict(temperature=0, max_new_tokens=6)
    first = {"role": "user", "content": [{"type": "image", "image": img}, "what?"]}
    a1 = api.chat([first], **kw)
    a2 = api.chat([first, {"role": "assistant", "content": a1.answer, "reasoning_content": a1.reasoning},
                   {"role": "user", "content": "and now?"}], **kw)
    assert out.split("\n")[:2] == [a1.answer, a2.answer]


def test_missing_model_and_files(ckpt, capsys, monkeypatch, tmp_path):
    code, out, err = run(["chat", "--model", str(tmp_path / "nope"), "hi"], capsys)
    assert code == 2 and "nope" in err and "no checkpoint" in err and out == ""
    monkeypatch.chdir(tmp_path)  # no runs/demo/model here
    code, _, err = run(["chat", "hi"], capsys)
    assert code == 2 and "runs/demo/model" in err and "make demo" in err
    code, _, err = run(chat_args(ckpt, "--image", str(tmp_path / "missing.png"), "hi"), capsys)
    assert code == 2 and "missing.png" in err


def test_bad_knob_is_a_clear_error(ckpt, capsys):
    code, _, err = run(chat_args(ckpt, "--think-budget", "3", "hi"), capsys)  # budget without --think
    assert code == 2 and "think_budget" in err


def test_help_has_examples(capsys):
    for cmd in ("chat", "serve"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"vlmcook {cmd} --model" in out


def test_info_on_saved_and_truncated_checkpoint(ckpt, capsys, tmp_path):
    folder, n_params = ckpt[0] / "model", ckpt[1]
    code, out, _ = run(["info", str(folder)], capsys)
    assert code == 0 and f"{n_params:,} parameters" in out
    cfg = PRESETS["tiny"]
    assert f"llm: {cfg.llm.num_hidden_layers} layers x {cfg.llm.hidden_size}" in out
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:len(data) // 2] if f.suffix == ".safetensors" else data)
    code, out, err = run(["info", str(broken)], capsys)
    assert code == 2 and out == ""
    assert "truncated" in err and ".safetensors" in err


def test_serve_command_wiring(ckpt, capsys, monkeypatch, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from vlmcook.infer import serve

    seen = {}
    monkeypatch.setattr(serve, "run", lambda model, host, port, settings, log_level: seen.update(
        model=model, host=host, port=port, settings=settings))
    argv = ["serve", "--model", str(ckpt[0] / "model"), "--port", "9999", "--allowed-media-dir", str(tmp_path),
            "--max-images", "2", "--max-frames", "16", "--max-request-mb", "3"]
    assert cli.main(argv) == 0
    st = seen["settings"]
    assert (seen["host"], seen["port"], st.model_name) == ("127.0.0.1", 9999, "model")
    assert (st.allowed_media_dir, st.max_images, st.max_frames, st.max_request_mb) == (tmp_path.resolve(), 2, 16, 3)
    assert seen["model"].engine.context_length == PRESETS["tiny"].llm.max_position_embeddings
    code, _, err = run(["serve", "--model", str(tmp_path / "nope")], capsys)
    assert code == 2 and "no checkpoint" in err
    code, _, err = run(argv[:3] + ["--allowed-media-dir", str(tmp_path / "nodir")], capsys)
    assert code == 2 and "nodir" in err
