"""Synthetic sources: determinism, and answers recovered from the pixels (the written mp4 decoded with PyAV directly,
the PNGs), never from the generator's own bookkeeping."""

import json
import re
from collections import deque

import numpy as np
import pytest
from PIL import Image

from vlmcook.data import synth_images as si
from vlmcook.data import synth_video as sv

PALETTE = np.array(list(sv.COLOURS.values()) + [sv.BACKGROUND], dtype=float)
NAMES = list(sv.COLOURS) + ["bg"]


def classify(frame: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] index of the nearest palette colour (last = background)."""
    d = ((frame[:, :, None, :].astype(float) - PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def present(frame: np.ndarray, min_px: int = 40) -> dict[str, np.ndarray]:
    """Colour name -> boolean mask, for colours covering at least min_px pixels."""
    lab = classify(frame)
    return {NAMES[k]: lab == k for k in range(len(NAMES) - 1) if (lab == k).sum() >= min_px}


def decode_all(path) -> list[tuple[float, np.ndarray]]:
    import av

    with av.open(str(path)) as c:
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


def answer_from_pixels(task: str, question: str, frames) -> str:
    seen = [present(f) for _, f in frames]
    if task == "order":
        first = {}
        for k, s in enumerate(seen):
            for c in s:
                first.setdefault(c, k)
        order = sorted(first, key=first.get)
        word = re.search(r"appeared (first|second|last)", question).group(1)
        return order[{"first": 0, "second": 1, "last": -1}[word]]
    if task == "count":
        colour = re.search(r"the (\w+) disc", question).group(1)
        on = [colour in s for s in seen]
        return str(sum(1 for k, v in enumerate(on) if v and (k == 0 or not on[k - 1])))
    if task == "motion":
        colour = re.search(r"the (\w+) square", question).group(1)
        (y0, x0), (y1, x1) = [np.argwhere(s[colour]).mean(0) for s in (seen[0], seen[-1])]
        dx, dy = x1 - x0, y1 - y0
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    t = float(re.search(r"at (\d+\.5) seconds", question).group(1))
    _, frame = min(frames, key=lambda tf: abs(tf[0] - t))
    (colour,) = present(frame).keys()
    return colour


@pytest.mark.parametrize("task", sv.TASKS)
def test_video_answers_match_the_decoded_mp4(tmp_path, task):
    src = sv.SynthVideoQA(seed=3, n=2, tasks=(task,))
    path = src.write(tmp_path)
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        frames = decode_all(tmp_path / rec["videos"][0]["path"])
        assert abs(len(frames) / src.fps - rec["meta"]["duration"]) < 0.15
        q = rec["messages"][0]["content"]
        assert q.startswith("(<video>./</video>)\n")
        assert answer_from_pixels(task, q, frames) == rec["messages"][1]["content"], rec["id"]


def test_video_tasks_need_time():
    """One frame cannot answer: the order/count/at_time colours are not all visible at any single instant, and the
    motion square sits at the centre line in the middle frame whatever the direction."""
    for i in range(12):
        sc = sv.scene(5, i)
        if sc.task in ("order", "count", "at_time"):
            for t in np.arange(0, sc.duration, 0.1):
                visible = [s for s in sc.shapes if s.t0 <= t < s.t1]
                assert len(visible) <= 1, (sc.task, t)


def test_video_sampled_by_the_processor_path_still_answers(tmp_path):
    """At the record's sampling fps, the frames video.py returns still show every flash (count task)."""
    from vlmcook.data.video import load_video

    src = sv.SynthVideoQA(seed=1, n=1, tasks=("count",), sample_fps=4.0)
    path = src.write(tmp_path)
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        clip = load_video(str(tmp_path / rec["videos"][0]["path"]), fps=rec["videos"][0]["fps"], query_num=8)
        frames = [(t, np.asarray(f)) for t, f in zip(clip.plan.timestamps, clip.frames)]
        assert answer_from_pixels("count", rec["messages"][0]["content"], frames) == rec["messages"][1]["content"]


def test_video_determinism():
    a, b, c = sv.SynthVideoQA(seed=7, n=20), sv.SynthVideoQA(seed=7, n=20), sv.SynthVideoQA(seed=8, n=20)
    assert [a.scene(i) for i in range(20)] == [b.scene(i) for i in range(20)]
    assert [a.scene(i) for i in range(20)] != [c.scene(i) for i in range(20)]
    fa = sv.render_frames(a.scene(4), 10, (112, 112))
    fb = sv.render_frames(b.scene(4), 10, (112, 112))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(fa, fb))
    assert {a.scene(i).task for i in range(20)} == set(sv.TASKS)
    with pytest.raises(ValueError, match="even"):
        sv.SynthVideoQA(size=(111, 112))



def test_yuv_conversion_matches_swscale_and_encoding_is_a_function_of_the_frames():
    """Our RGB -> yuv420p (issue 12: PyAV's conversion once encoded 2 of 1500 videos differently) against FFmpeg's
    swscale through PyAV: luma within one level on noise, chroma within one level on flat 2x2 blocks of a colour
    (swscale filters chroma over a wider window, so noise differs there); the same frames give the same bytes in
    threads."""
    from concurrent.futures import ThreadPoolExecutor

    import av

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    ours, ref = (f.astype(int) for f in (sv.to_yuv420p(noise),
                                          av.VideoFrame.from_image(noise).reformat(format="yuv420p").to_ndarray()))
    assert ours.shape == ref.shape == (96, 96)
    assert np.abs(ours[:64] - ref[:64]).max() <= 1
    for colour in list(si.COLOURS.values()) + [si.BACKGROUND]:
        flat = Image.new("RGB", (32, 16), colour)
        ours, ref = (f.astype(int) for f in (sv.to_yuv420p(flat),
                                              av.VideoFrame.from_image(flat).reformat(format="yuv420p").to_ndarray()))
        assert np.abs(ours - ref).max() <= 1, colour
    frames = sv.render_frames(sv.scene(0, 3), 10, (112, 112))
    with ThreadPoolExecutor(4) as pool:
        outs = set(pool.map(lambda _: sv.encode_mp4(frames, 10), range(8)))
    assert len(outs) == 1

# ---- images and text -------------------------------------------------------------------------------------------
def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask -> list of [n, 2] (y, x) pixel arrays."""
    seen, out = np.zeros_like(mask), []
    for y, x in np.argwhere(mask):
        if seen[y, x]:
            continue
        q, pix = deque([(y, x)]), []
        seen[y, x] = True
        while q:
            a, b = q.popleft()
            pix.append((a, b))
            for u, v in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= u < mask.shape[0] and 0 <= v < mask.shape[1] and mask[u, v] and not seen[u, v]:
                    seen[u, v] = True
                    q.append((u, v))
        out.append(np.array(pix))
    return out


def test_image_answers_from_pixels(tmp_path):
    src = si.SynthImageQA(seed=2, n=24, tasks=("caption", "colour", "position"))
    path = src.write(tmp_path)
    checked = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        img = np.asarray(Image.open(tmp_path / rec["images"][0]).convert("RGB"))
        lab = classify(img)
        comps = [(NAMES[lab[tuple(c[0])]], c[:, 1].mean()) for c in components(lab != len(NAMES) - 1)]
        answer, task = rec["messages"][1]["content"], rec["meta"]["task"]
        if task == "caption":  # colours left to right (shape kinds are checked by the count of components)
            parts = answer.split(", ")
            assert len(parts) == len(comps)
            assert [p.split()[1] for p in parts] == [c for c, _ in sorted(comps, key=lambda t: t[1])]
        elif task == "colour":
            assert [c for c, _ in comps] == [answer]
        else:
            assert ("left" if comps[0][1] < img.shape[1] / 2 else "right") == answer
        checked += 1
    assert checked == 24


def test_rendered_word_is_legible():
    pytesseract = pytest.importorskip("pytesseract")
    for i in range(3):
        img, q, a, _ = si.image_qa(4, i, tasks=("word",))
        big = img.resize((img.width * 2, img.height * 2)).convert("L")
        text = pytesseract.image_to_string(big, config="--psm 7").strip().lower()
        assert a in text, (a, text)


def test_text_answers_and_determinism():
    src = si.SynthText(seed=0, n=200)
    for i in range(200):
        q, a = src.record(i)["messages"][0]["content"], src.record(i)["messages"][1]["content"]
        if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", q):
            x, op, y = int(m[1]), m[2], int(m[3])
            assert int(a) == (x + y if op == "+" else x - y)
        elif m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", q):
            assert a == ("they are equal" if m[1] == m[2] else str(max(int(m[1]), int(m[2]))))
        elif m := re.fullmatch(r"Spell the word '(\w+)' backwards\.", q):
            assert a == m[1][::-1]
    assert [src.record(i) for i in range(20)] == [si.SynthText(0, 200).record(i) for i in range(20)]
    assert [src.record(i) for i in range(20)] != [si.SynthText(1, 200).record(i) for i in range(20)]
    a, b = si.SynthImageQA(seed=1), si.SynthImageQA(seed=1)
    assert all(np.array_equal(np.asarray(a.record(i)["images"][0]), np.asarray(b.record(i)["images"][0]))
               for i in range(5))
    assert [a.record(i)["messages"] for i in range(10)] != [si.SynthImageQA(seed=2).record(i)["messages"]
                                                            for i in range(10)]


def test_video_captions_list_the_events_in_time_order():
    """A caption holds the facts each question asks about: the k-th disc for order, as many discs as the count,
    the colour of every second for at_time, the direction for motion; captions=True swaps only the target."""
    for i in range(40):
        sc = sv.scene(7, i)
        cap = sv.caption(sc)
        if sc.task == "order":
            assert [c.split()[0] for c in cap.rstrip(".").split(", then ")] == sc.facts["order"]
        elif sc.task == "count":
            assert cap.count(f"{sc.facts['colour']} disc") == sc.facts["count"]
        elif sc.task == "at_time":
            assert cap.rstrip(".").split(", then ") == sc.facts["colours"]
        else:
            assert f"moves {sc.facts['direction']}" in cap
    qa, caps = sv.SynthVideoQA(seed=7, n=3, size=(64, 48), fps=5), sv.SynthVideoQA(seed=7, n=3, size=(64, 48), fps=5,
                                                                                    captions=True)
    a, b = qa.record(1), caps.record(1)
    assert a["videos"] == b["videos"] and a["meta"] == b["meta"]
    assert b["messages"][1]["content"] == sv.caption(qa.scene(1)) != a["messages"][1]["content"]


def test_count_video_length_does_not_tell_the_count():
    """A count video's length is drawn from one range whatever the count (the model could otherwise count packages
    instead of flashes), and every flash ends inside it with its gaps kept."""
    lengths = {}
    for i in range(300):
        sc = sv.scene(11, i, tasks=("count",))
        lengths.setdefault(sc.facts["count"], []).append(sc.duration)
        times = sorted((s.t0, s.t1) for s in sc.shapes)
        assert times[-1][1] <= sc.duration - 0.29 and all(b + 0.59 <= c for (_, b), (c, _) in zip(times, times[1:]))
    assert sorted(lengths) == [1, 2, 3, 4, 5]
    for k, ds in lengths.items():
        assert sv.COUNT_DURATION[0] <= min(ds) and max(ds) <= sv.COUNT_DURATION[1], k
