"""Processor: docs/reference.md 11 vectors (token counts, bounds, views, packages), ids and bounds against an
independent re-statement of the released text assembly (whole-text encode + start/end token scan), video packages,
labels, collate, token accounting agreeing with the real output, bad inputs."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from media import write_video
from vlmcook.config import MiniCPMVConfig
from vlmcook.data import chat
from vlmcook.data.image import IMAGE_MARKER, ImageError, preprocess_image, slice_grid
from vlmcook.data.processor import ContextLengthError, Processor, collate
from vlmcook.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def big(reference_dir):
    return Processor(Tokenizer.from_dir(reference_dir), MiniCPMVConfig.from_name("v4_5"))


@pytest.fixture(scope="module")
def v45():
    """v4_5 numbers (448 px, 64 queries, 9 slices) with the tiny tokenizer: section 11 vectors, no release files."""
    return Processor(Tokenizer.tiny(), MiniCPMVConfig.from_name("v4_5"))


@pytest.fixture(scope="module")
def tiny():
    return Processor(Tokenizer.tiny(), MiniCPMVConfig.from_name("tiny"))


def _img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def run(proc, messages, **kw):
    """Processor output, checked against count_tokens and the data contract."""
    out = proc(messages, **kw)
    cnt = proc.count_tokens(messages, **kw)
    ids, bounds = out["input_ids"][0], out["image_bound"][0]
    q = proc.query_num
    assert out["input_ids"].shape == out["attention_mask"].shape == (1, cnt.total)
    assert cnt.visual_tokens == int((bounds[:, 1] - bounds[:, 0]).sum()) == len(out["temporal_ids"][0]) * q
    assert cnt.text_tokens == cnt.total - cnt.visual_tokens
    assert cnt.views == len(out["pixel_values"][0]) == sum(len(p) for p in out["temporal_ids"][0])
    assert cnt.packages == len(out["temporal_ids"][0])
    assert all(bool((ids[s:e] == proc.tokenizer.unk_id).all()) and e - s == q for s, e in bounds.tolist())
    assert int((ids == proc.tokenizer.unk_id).sum()) == cnt.visual_tokens  # no stray <unk> outside the bounds
    for v in out["pixel_values"][0]:
        assert v.dtype == torch.float32 and v.shape[0] == 3 and v.shape[1] % 14 == 0 and v.shape[2] % 14 == 0
    return out, cnt


# ---- independent re-statement of the released text assembly (docs/reference.md 6.4, 7.3, 8.4) ----------------------
def _ref_placeholder(size, idx, q, use_id, max_slice):
    u = "<unk>" * q
    text = (f"<image_id>{idx}</image_id>" if use_id else "") + f"<image>{u}</image>"
    grid = slice_grid(size, 448 if q == 64 else 224, max_slice)
    if grid:
        text += "\n".join([f"<slice>{u}</slice>" * grid[0]] * grid[1])
    return text


def _ref_ids(tok, prompt, sizes, q, use_id, max_slice, skip=()):
    """Marker i -> placeholder with id i; skipped frames -> '' with the chunk before them stripped; encode the whole
    text; bounds from <image>/<slice> starts (+1) and </image>/</slice> ends."""
    chunks = prompt.split(IMAGE_MARKER)
    assert len(chunks) - 1 == len(sizes)
    text = ""
    for i, size in enumerate(sizes):
        if i in skip:
            text += chunks[i].strip()
        else:
            text += chunks[i] + _ref_placeholder(size, i, q, use_id, max_slice)
    ids = tok.encode(text + chunks[-1])
    t = torch.tensor(ids)
    starts = torch.where((t == tok.image_start_id) | (t == tok.slice_start_id))[0] + 1
    ends = torch.where((t == tok.image_end_id) | (t == tok.slice_end_id))[0]
    return ids, torch.stack([starts, ends], 1)


def _joined(content):
    return "\n".join(IMAGE_MARKER if isinstance(c, Image.Image) else c for c in content)


# ---- docs/reference.md 11 vectors ------------------------------------------------------------------------------
@pytest.mark.parametrize("size, n_tokens, bounds, shapes", [
    ((1000, 600), 201, [[7, 71], [73, 137], [139, 203]], [(350, 574), (490, 406), (490, 406)]),  # vector 1
    ((448, 448), 69, [[7, 71]], [(448, 448)]),  # vector 2
    ((224, 224), 69, [[7, 71]], [(448, 448)]),
    ((600, 1000), 202, [[7, 71], [73, 137], [140, 204]], [(574, 350), (406, 490), (406, 490)]),  # vector 5
    ((100, 1000), 69, [[7, 71]], [(1414, 140)]),  # vector 8
])
def test_image_vectors(v45, size, n_tokens, bounds, shapes):
    # v4_5 numbers with the tiny tokenizer, which (like the released one) spends 3 tokens on "<|im_start|>user\n"
    # and one per digit / newline, so the released counts and bounds hold (with the release: test_released_ids)
    tok = v45.tokenizer
    out, cnt = run(v45, [{"role": "user", "content": [_img(*size), "Hi"]}])
    ids = out["input_ids"][0].tolist()
    assert ids[:4] == tok.encode("<|im_start|>user\n<image_id>")  # the placeholder starts at index 3
    assert cnt.items[0].placeholder_tokens == n_tokens
    assert ids[3 + n_tokens - 1] in (tok.image_end_id, tok.slice_end_id)  # ends at </image> or </slice> ...
    assert ids[3 + n_tokens] == tok.encode("\n")[0]  # ... followed by the "\n" that joins "Hi"
    assert out["image_bound"][0].tolist() == bounds
    assert [tuple(v.shape[1:]) for v in out["pixel_values"][0]] == shapes
    assert out["temporal_ids"][0] == [[-1]] * len(shapes)


def test_vector_3_1920x1080(v45):
    msgs = [{"role": "user", "content": [_img(1920, 1080), "Hi"]}]
    out, cnt = run(v45, msgs)
    assert (cnt.items[0].placeholder_tokens, cnt.views, cnt.visual_tokens) == (598, 9, 576)
    out, cnt = run(v45, msgs, use_image_id=False)
    assert cnt.items[0].placeholder_tokens == 595 and out["image_bound"][0][0].tolist() == [4, 68]
    out, cnt = run(v45, msgs, max_slice_nums=1)
    assert cnt.items[0].placeholder_tokens == 69 and tuple(out["pixel_values"][0][0].shape) == (3, 336, 602)


def test_vector_6_4032x3024_counts(v45):
    # counted from the header only (no pixels): 10 views, 640 <unk>, 665 placeholder tokens (2 row newlines)
    cnt = v45.count_tokens([{"role": "user", "content": [_img(4032, 3024), "Hi"]}])
    assert (cnt.views, cnt.visual_tokens, cnt.items[0].placeholder_tokens) == (10, 640, 665)


def test_released_ids(big):
    out, cnt = run(big, [{"role": "user", "content": [_img(1000, 600), "Hi"]}])
    ids = out["input_ids"][0].tolist()
    assert ids[:4] == [151644, 872, 198, 151681]  # <|im_start|> user \n <image_id>
    assert ids[4:6] == [15, 151682] and ids[6] == 151669  # "0" </image_id> <image>
    assert ids[203:205] == [151680, 198] and cnt.items[0].placeholder_tokens == 201
    assert out["image_bound"][0].tolist() == [[7, 71], [73, 137], [139, 203]]


def test_vector_15_prompt_ends(big):
    msgs = [{"role": "user", "content": "What is this?"}]
    assert run(big, msgs)[0]["input_ids"][0, -7:].tolist() == [151644, 77091, 198, 151667, 271, 151668, 271]
    assert run(big, msgs, thinking=True)[0]["input_ids"][0, -5:].tolist() == [151644, 77091, 198, 151667, 198]


# ---- ids and bounds equal the re-statement of the release ------------------------------------------------------------
def _multi_image_conversation(seed):
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(20, 1500)), int(rng.integers(20, 1500))) for _ in range(4)]
    imgs = [_img(w, h, k) for k, (w, h) in enumerate(sizes)]
    msgs = [{"role": "system", "content": "You look at images."},
            {"role": "user", "content": [imgs[0], "Compare with", imgs[1], "please!"]},
            {"role": "assistant", "content": "<think>hmm</think>They differ."},
            {"role": "user", "content": [imgs[2], imgs[3], "和这两张呢？"]}]
    return msgs, sizes


@pytest.mark.parametrize("use_id, max_slice, thinking", [(None, None, False), (False, 4, True), (True, 2, None)])
def test_ids_match_release_text_assembly_tiny(tiny, use_id, max_slice, thinking):
    msgs, sizes = _multi_image_conversation(1)
    out, cnt = run(tiny, msgs, use_image_id=use_id, max_slice_nums=max_slice, thinking=thinking)
    prompt = chat.render([{**m, "content": m["content"] if isinstance(m["content"], str) else _joined(m["content"])}
                          for m in msgs], thinking=thinking)
    ids, bounds = _ref_ids(tiny.tokenizer, prompt, sizes, 8, use_id is not False, max_slice or 4)
    assert out["input_ids"][0].tolist() == ids
    assert torch.equal(out["image_bound"][0], bounds)
    # views: image by image, each exactly its own preprocessing
    want = [v for k, s in enumerate(sizes) for v in preprocess_image(_img(*s, k), 224, max_slice or 4).views]
    assert len(want) == len(out["pixel_values"][0])
    assert all(torch.equal(a, b) for a, b in zip(out["pixel_values"][0], want))


def test_ids_match_release_text_assembly_released(big):
    msgs, sizes = _multi_image_conversation(2)
    out, _ = run(big, msgs)
    prompt = chat.render([{**m, "content": m["content"] if isinstance(m["content"], str) else _joined(m["content"])}
                          for m in msgs])
    ids, bounds = _ref_ids(big.tokenizer, prompt, sizes, 64, True, 9)
    assert out["input_ids"][0].tolist() == ids and torch.equal(out["image_bound"][0], bounds)


def test_count_tokens_agrees_on_random_prompts(tiny):
    rng = np.random.default_rng(7)
    for trial in range(12):
        msgs = []
        for turn in range(int(rng.integers(1, 4))):
            content = []
            for _ in range(int(rng.integers(0, 4))):
                w, h = (int(x) for x in rng.integers(1, 800, 2))
                content.append(_img(w, h, trial) if rng.random() < 0.5 else {"type": "image", "image": _img(w, h)})
                if rng.random() < 0.5:
                    content.append(str(rng.choice(["Hi", "描述一下", "x = 1\n", ""])))
            msgs += [{"role": "user", "content": content or "text only"}, {"role": "assistant", "content": "ok."}]
        kw = dict(max_slice_nums=int(rng.integers(1, 10)), use_image_id=bool(rng.random() < 0.5),
                  thinking=[True, False, None][trial % 3], add_generation_prompt=bool(trial % 2))
        run(tiny, msgs, **kw)  # compares every count with the real output


def test_marker_strings_with_images_argument(tiny):
    a, b = _img(300, 200, 1), _img(50, 900, 2)
    listed = tiny([{"role": "user", "content": [a, "x", b, "y"]}])
    marked = tiny([{"role": "user", "content": f"{IMAGE_MARKER}\nx\n{IMAGE_MARKER}\ny"}], images=[a, b])
    assert torch.equal(listed["input_ids"], marked["input_ids"])
    assert all(torch.equal(p, q) for p, q in zip(listed["pixel_values"][0], marked["pixel_values"][0]))
    with pytest.raises(ValueError, match="more .* markers than the 1 images"):
        tiny([{"role": "user", "content": f"{IMAGE_MARKER}{IMAGE_MARKER}"}], images=[a])
    with pytest.raises(ValueError, match="2 images were given but .* only 1"):
        tiny([{"role": "user", "content": f"{IMAGE_MARKER} hi"}], images=[a, b])
    # no marker anywhere: the images go in front of the last user message, as the release's chat() does
    unmarked = tiny([{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                     {"role": "user", "content": "no marker"}], images=[a, b])
    placed = tiny([{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                   {"role": "user", "content": [a, b, "no marker"]}])
    assert torch.equal(unmarked["input_ids"], placed["input_ids"]) and len(unmarked["pixel_values"][0]) == \
        len(placed["pixel_values"][0]) > 0
    assert torch.equal(tiny("no marker", images=[a])["input_ids"], tiny([{"role": "user", "content": [a, "no marker"]}])["input_ids"])


def test_image_ids_count_placeholders(tiny):
    msgs = [{"role": "user", "content": [_img(30, 30), _img(40, 40)]}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image", "image": _img(50, 50)}, "third"]}]
    text = tiny.tokenizer.decode(tiny(msgs)["input_ids"][0])
    assert re.findall(r"<image_id>(\d+)</image_id>", text) == ["0", "1", "2"]


# ---- video -----------------------------------------------------------------------------------------------------------
def _frames(n, w=1280, h=720):
    return [Image.new("RGB", (w, h), (20 * k, 255 - 20 * k, 7 * k)) for k in range(n)]


def test_vector_13_frame_packing_layout(tiny):
    proc = tiny
    packages = [[1, 3, 5], [7, 9, 11], [13]]
    msgs = [{"role": "user", "content": [{"type": "video", "frames": _frames(7), "packages": packages},
                                         "Describe"]}]
    out, cnt = run(proc, msgs)
    q = proc.query_num
    u = "<unk>" * q
    body = f"<image>{u}</image>\n<image>{u}</image>\n<image>{u}</image>\nDescribe"
    assert proc.tokenizer.decode(out["input_ids"][0]).startswith(f"<|im_start|>user\n{body}<|im_end|>")
    assert out["temporal_ids"][0] == packages and len(out["pixel_values"][0]) == 7
    assert cnt.items[0].spans == [(0.1, 0.5), (0.7, 1.1), (1.3, 1.3)]


def test_video_slicing_settings_precedence(tiny):
    frames = {"type": "video", "frames": _frames(2), "packages": [[0, 5]]}
    default = tiny.count_tokens([{"role": "user", "content": [frames]}])
    assert (default.views, default.packages) == (2, 1)  # README video default: max_slice_nums=1, no image ids
    called = tiny.count_tokens([{"role": "user", "content": [frames]}], max_slice_nums=4, use_image_id=True)
    # 1280x720 at 224 px, max 4 slices: counts {3, 4}; |ln(16/9) - ln(3/1)| = 0.523 is the smallest -> 3 cols x 1 row
    grid_views = 1 + 3
    assert (called.views, called.packages) == (2 * grid_views, grid_views)
    own = tiny.count_tokens([{"role": "user", "content": [{**frames, "max_slice_nums": 1}]}], max_slice_nums=4)
    assert own.views == 2
    out = tiny([{"role": "user", "content": [frames]}], use_image_id=True)
    assert "<image_id>0</image_id>" in tiny.tokenizer.decode(out["input_ids"][0])


def test_vector_13_released_bounds_and_sliced_frames(big):
    packages = [[1, 3, 5], [7, 9, 11], [13]]
    frames = _frames(7)
    msgs = [{"role": "user", "content": [{"type": "video", "frames": frames, "packages": packages}, "Describe"]}]
    out, cnt = run(big, msgs)
    assert out["image_bound"][0].tolist() == [[4, 68], [71, 135], [138, 202]] and cnt.visual_tokens == 192
    # the release, whose frames are 7 markers joined by "\n" with frames 2-3 and 5-6 skipped, gives the same ids
    prompt = chat.render([{"role": "user", "content": "\n".join([IMAGE_MARKER] * 7 + ["Describe"])}])
    ids, _ = _ref_ids(big.tokenizer, prompt, [f.size for f in frames], 64, False, 1, skip={1, 2, 4, 5})
    assert out["input_ids"][0].tolist() == ids
    # defaults of the images (use_image_id True, max_slice_nums 9): 3x2 slices -> 7 views per frame
    video = {"type": "video", "frames": frames, "packages": packages, "max_slice_nums": 9, "use_image_id": True}
    out, cnt = run(big, [{"role": "user", "content": [video, "Describe"]}])
    assert (cnt.views, cnt.packages, cnt.visual_tokens) == (49, 21, 1344)
    text = big.tokenizer.decode(out["input_ids"][0])
    # the release numbers them 0, 3, 6 (docs/reference.md 10.3)
    assert re.findall(r"<image_id>(\d+)</image_id>", text) == ["0", "1", "2"]
    # order: package, then view index, then frame; each package repeats its ids once per view index
    per_frame = [preprocess_image(f, 448, 9).views for f in frames]
    order = [(f, s) for pk in ([0, 1, 2], [3, 4, 5], [6]) for s in range(7) for f in pk]
    assert all(torch.equal(v, per_frame[f][s]) for v, (f, s) in zip(out["pixel_values"][0], order))
    assert out["temporal_ids"][0] == [packages[0]] * 7 + [packages[1]] * 7 + [packages[2]] * 7


@pytest.fixture(scope="module")
def video_6s(tmp_path_factory):
    """6 s at 30 fps (180 frames), 320x180, frame k filled with grey level k (docs/reference.md 11.9-11.11 timing)."""
    pytest.importorskip("av")
    frames = (np.full((180, 320, 3), k, np.uint8) for k in range(180))
    return write_video(tmp_path_factory.mktemp("video") / "six.mp4", frames, 30, codec="mpeg4")


@pytest.mark.parametrize("knobs, n_packages, n_views, n_unk, first_ids", [
    ({"fps": 5}, 30, 30, 1920, [[1], [3], [5]]),  # vector 9 (ids: video.py rounds to nearest, no 4.3 s -> 42 quirk)
    ({"fps": 2}, 12, 12, 768, [[2], [7], [12]]),  # vector 10
    ({"fps": 3, "packing": 3}, 6, 18, 384, [[2, 5, 8], [12, 15, 18]]),  # vector 11
])
def test_video_file_vectors(v45, video_6s, knobs, n_packages, n_views, n_unk, first_ids):
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(video_6s), **knobs}, "What happens?"]}]
    out, cnt = run(v45, msgs)
    assert (cnt.packages, cnt.views, cnt.visual_tokens) == (n_packages, n_views, n_unk)
    assert out["temporal_ids"][0][:len(first_ids)] == first_ids
    assert tuple(out["pixel_values"][0][0].shape) == (3, 336, 602)  # 16:9 frame, max_slice_nums=1 -> tgt (24, 43)
    spans = cnt.items[0].spans
    assert len(spans) == n_packages and all(0 <= a <= b <= 6 for a, b in spans)
    assert [round(a * 10) for a, _ in spans] == [p[0] for p in out["temporal_ids"][0]]


def test_video_budget_and_mixed_prompt(tiny, video_6s):
    video = {"type": "video", "video": video_6s.read_bytes(), "fps": 5, "max_visual_tokens": 10 * 8}
    msgs = [{"role": "system", "content": "Watch carefully."},
            {"role": "user", "content": [_img(500, 300), video, "Is the image a frame of the video?"]},
            {"role": "assistant", "content": "No."},
            {"role": "user", "content": ["And this one?", _img(90, 60, 3)]}]
    out, cnt = run(tiny, msgs)
    assert [i.kind for i in cnt.items] == ["image", "video", "image"]
    assert cnt.items[1].packages <= 10 and cnt.items[1].visual_tokens <= 80
    assert out["temporal_ids"][0][0] == [-1] and out["temporal_ids"][0][-1] == [-1]
    text = tiny.tokenizer.decode(out["input_ids"][0])
    assert re.findall(r"<image_id>(\d+)</image_id>", text) == ["0", "1"]  # the video shows no ids by default
    with pytest.raises(ValueError, match="max_visual_tokens must be an integer of at least one package \\(8 tokens\\), got 4"):
        tiny.count_tokens([{"role": "user", "content": [{**video, "max_visual_tokens": 4}]}])


# ---- labels, lengths, batches ----------------------------------------------------------------------------------------
def test_labels_mask_everything_but_the_answer(tiny):
    msgs = [{"role": "user", "content": [_img(300, 300), "What colour?"]},
            {"role": "assistant", "content": ["It is noisy.", _img(20, 20)]}]
    out, _ = run(tiny, msgs, add_generation_prompt=False)
    ids, labels = out["input_ids"][0], out["labels"][0]
    kept = labels != chat.IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    # the answer text + newline joiner + <|im_end|> are supervised; the assistant's image placeholder is not
    assert tiny.tokenizer.decode(ids[kept]) == "It is noisy.\n<|im_end|>"
    assert "labels" not in tiny(msgs)  # a generation prompt means inference: no labels


def test_max_length_never_truncates(tiny):
    msgs = [{"role": "user", "content": [_img(600, 600), "Hi"]}]
    n = tiny.count_tokens(msgs).total
    assert tiny(msgs, max_length=n)["input_ids"].shape[1] == n
    with pytest.raises(ValueError, match=f"{n} tokens, more than the {n - 1} tokens"):
        tiny(msgs, max_length=n - 1)
    # the length is checked before any pixel is decoded: a broken image body is not even read
    buf = io.BytesIO()
    _img(600, 600).save(buf, format="PNG")
    broken = [{"role": "user", "content": [{"type": "image", "image": buf.getvalue()[:200]}, "Hi"]}]
    with pytest.raises(ContextLengthError, match=f"{n} tokens, more than the {n - 1}"):
        tiny(broken, max_length=n - 1)
    # tokens reserved for the answer count against the limit; the error says so
    with pytest.raises(ContextLengthError, match=f"more than the {n - 1} tokens \\({n + 9} minus 10 reserved"):
        tiny(msgs, max_length=n + 9, reserve=10)
    assert tiny(msgs, max_length=n + 10, reserve=10)["input_ids"].shape[1] == n


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate(tiny, side):
    a = tiny([{"role": "user", "content": [_img(400, 300), "Hello!"]}, {"role": "assistant", "content": "Hi!"}],
             add_generation_prompt=False)
    b = tiny([{"role": "user", "content": "Just text!"}, {"role": "assistant", "content": "Yes."}],
             add_generation_prompt=False)
    batch = collate([a, b], pad_id=tiny.tokenizer.pad_id, padding_side=side)
    ta, tb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    T = max(ta, tb)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2, T)
    for row, s, t in ((0, a, ta), (1, b, tb)):
        sl = slice(T - t, T) if side == "left" else slice(0, t)
        assert torch.equal(batch["input_ids"][row, sl], s["input_ids"][0])
        assert torch.equal(batch["labels"][row, sl], s["labels"][0])
        assert int(batch["attention_mask"][row].sum()) == t
        pad = batch["attention_mask"][row] == 0
        assert (batch["input_ids"][row][pad] == tiny.tokenizer.pad_id).all()
        assert (batch["labels"][row][pad] == -100).all()
    for s, e in batch["image_bound"][0].tolist():
        assert (batch["input_ids"][0, s:e] == tiny.tokenizer.unk_id).all()
    assert len(batch["pixel_values"]) == len(batch["temporal_ids"]) == len(batch["image_bound"]) == 2
    assert batch["image_bound"][1].shape == (0, 2) and batch["pixel_values"][1] == []


def test_exclamation_mark_is_not_padding(big):
    # the release pads with 0 = "!" and masks every "!" (docs/reference.md 10.8)
    out = big([{"role": "user", "content": "Hello!"}])
    assert 0 in out["input_ids"][0].tolist() and bool(out["attention_mask"].all())
    batch = collate([out, big([{"role": "user", "content": "A much longer question here?"}])], big.tokenizer.pad_id)
    assert int(batch["attention_mask"][0].sum()) == out["input_ids"].shape[1]
    assert big.tokenizer.pad_id == 151643


# ---- bad input -------------------------------------------------------------------------------------------------------
def test_count_tokens_reads_headers_only(tiny):
    buf = io.BytesIO()
    _img(900, 700).save(buf, format="JPEG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]  # header intact, pixel data truncated
    msgs = [{"role": "user", "content": [{"type": "image", "image": cut}, "Hi"]}]
    full = tiny.count_tokens([{"role": "user", "content": [{"type": "image", "image": buf.getvalue()}, "Hi"]}])
    assert tiny.count_tokens(msgs) == full  # counted without touching the pixels
    with pytest.raises(ImageError, match="message 0 item 0.*truncated"):
        tiny(msgs)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ImageError, match="message 0 item 1.*not an image"):
        tiny([{"role": "user", "content": ["look", {"type": "image", "image": b"garbage"}]}])
    with pytest.raises(ImageError, match="message 1 item 0.*missing.jpg"):
        tiny.count_tokens([{"role": "user", "content": "a"},
                           {"role": "user", "content": [{"type": "image", "image": str(tmp_path / "missing.jpg")}]}])
    with pytest.raises(ValueError, match="unsupported content item of type int"):
        tiny([{"role": "user", "content": [3]}])
    with pytest.raises(ValueError, match="packages hold 2 frames but 3 frames"):
        tiny([{"role": "user", "content": [{"type": "video", "frames": _frames(3, 32, 32), "packages": [[0, 1]]}]}])
    with pytest.raises(ValueError, match="a package holds 7 frames; a package takes at most 6"):
        tiny([{"role": "user", "content": [{"type": "video", "frames": _frames(7, 32, 32),
                                            "packages": [list(range(7))]}]}])
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['speed'\\]"):
        tiny([{"role": "user", "content": [{"type": "video", "video": "x.mp4", "speed": 2}]}])
    with pytest.raises(ValueError, match="reasoning is dropped"):
        tiny([{"role": "user", "content": "q"}, {"role": "assistant", "content": [_img(20, 20), "</think>a"]},
              {"role": "user", "content": "q2"}])
    with pytest.raises(ValueError, match="max_slice_nums must be an int >= 1, got 0"):
        tiny([{"role": "user", "content": [_img(20, 20)]}], max_slice_nums=0)
    with pytest.raises(ValueError, match="non-empty list"):
        tiny([])


def test_a_video_is_opened_once_per_call(tiny, tmp_path, monkeypatch):
    """Probe, plan and decode share one opened container: av.open runs once per video per processor call."""
    import av

    from media import write_video

    path = write_video(tmp_path / "clip.mp4", [Image.new("RGB", (64, 48), (20 * k, 0, 0)) for k in range(20)], fps=10)
    calls = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: calls.append(a) or real_open(*a, **k))
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(path), "fps": 5}, "What happens?"]}]
    out = tiny(msgs)
    assert len(calls) == 1 and out["count"].items[0].packages == len(out["temporal_ids"][0]) > 1
    calls.clear()
    tiny.count_tokens(msgs)
    assert len(calls) == 1


def test_text_first_checkpoints_get_the_question_before_their_media():
    """config.text_first (the demo model's): media-first and text-first messages give the same ids, with the text
    before the placeholders; a released-layout config (text_first False) keeps the order it is given."""
    from dataclasses import replace

    cfg = MiniCPMVConfig.from_name("tiny")
    proc, released = Processor(Tokenizer.tiny(), replace(cfg, text_first=True)), Processor(Tokenizer.tiny(), cfg)
    img = _img(60, 40)
    media_first = [{"role": "user", "content": [img, "Read the text on this page."]}]
    text_first = [{"role": "user", "content": ["Read the text on this page.", img]}]
    inline = [{"role": "user", "content": f"{IMAGE_MARKER}\nRead the text on this page."}]
    ids = [proc(m, images=[img] if m is inline else None)["input_ids"] for m in (media_first, text_first, inline)]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])
    text = proc.tokenizer.decode(ids[0][0])
    assert text.index("Read the text") < text.index("<image>")
    assert not torch.equal(released(media_first)["input_ids"], released(text_first)["input_ids"])
    round_trip = MiniCPMVConfig.from_hf_dict(replace(cfg, text_first=True).to_hf_dict())
    assert round_trip.text_first and "text_first" not in cfg.to_hf_dict()
