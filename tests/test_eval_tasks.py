"""`vlmcook eval` file formats and runner, without a model: tiny fixture files written here in each published layout
(VLMEvalKit TSV with base64 images drawn by Pillow, OCRBench / VQA TSVs, Video-MME parquet / nested JSON / JSONL
with a short mp4, SFT JSONL), read by the tasks; the runner driven by a scripted backend (predictions, errors kept in
the denominator, resume, refused setting changes, --compare). The fixture builders are imported by the other
test_eval_* files."""

import base64
import csv
import io
import json

import pytest
from PIL import Image, ImageDraw

from vlmcook.cli import main
from vlmcook.eval.backends import Output
from vlmcook.eval.run import EvalConfig, compare, read_predictions, run
from vlmcook.eval.tasks import make_task
from vlmcook.eval.tasks.jsonl import inline_images


# ---- fixture builders ---------------------------------------------------------------------------------------------
def png(color=(200, 30, 30), size=(56, 42)) -> bytes:
    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).rectangle((8, 8, 30, 24), fill=(20, 20, 220))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_tsv(path, header, rows):
    """Tab-separated with minimal quoting, as pandas' to_csv(sep="\\t") writes VLMEvalKit's files."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


MCQ_HEADER = ["index", "image", "question", "hint", "A", "B", "C", "answer", "category", "split"]


def mcq_tsv(path):
    red, green = b64(png((220, 0, 0))), b64(png((0, 200, 0)))
    return write_tsv(path, MCQ_HEADER, [
        [0, red, "What colour\tis the\nbackground?", "", "red", "green", "blue", "A", "colour", "dev"],
        [1, green, "What colour is the background?", "Look closely.", "red", "green", "None", "B", "colour", "dev"],
        [2, "0", "Same picture as row 0?", "", "yes", "no", "", "A", "same", "test"],  # image shared with row 0
        [3, red, "", "", "yes", "no", "", "A", "same", "test"],  # question missing
        [4, "A" * 65, "Broken image?", "", "yes", "no", "", "A", "broken", "test"],  # not base64 (bad padding)
    ])


def mp4_file(path, n=6, fps=6.0, size=(32, 32)):
    from vlmcook.data.synth_video import encode_mp4

    pytest.importorskip("av")
    frames = [Image.new("RGB", size, (40 * i % 255, 90, 160)) for i in range(n)]
    path.write_bytes(encode_mp4(frames, fps))
    return path


VMME_ROWS = [
    {"video_id": "001", "videoID": "clipA", "question_id": "001-1", "duration": "short", "domain": "Knowledge",
     "sub_category": "Astronomy", "task_type": "Counting Problem", "question": "How many colours?",
     "options": ["A. One.", "B. Two.", "C. Three.", "D. Six."], "answer": "D"},
    {"video_id": "002", "videoID": "clipB", "question_id": "002-1", "duration": "long", "domain": "Life Record",
     "sub_category": "Travel", "task_type": "Object Recognition", "question": "What is shown?",
     "options": ["A. A car.", "B. A sky.", "C. A sea.", "D. A cat."], "answer": "B"},  # clipB.mp4 is missing
    {"video_id": "001", "videoID": "clipA", "question_id": "001-2", "duration": "short", "domain": "Knowledge",
     "sub_category": "Astronomy", "task_type": "Temporal Perception", "question": "Does it change?",
     "options": None, "answer": "A"},  # options missing
]


def videomme_dir(folder, fmt="parquet"):
    """The question file + data/<video>.mp4 (the nested template has no videoID: its videos go by video_id)."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    mp4_file(folder / "data" / ("001.mp4" if fmt == "json" else "clipA.mp4"))
    if fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        (folder / "videomme").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(VMME_ROWS), folder / "videomme" / "test-00000-of-00001.parquet")
    elif fmt == "jsonl":
        (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in VMME_ROWS))
    else:  # the official nested layout (the repo's output template)
        videos = {}
        for r in VMME_ROWS:
            v = videos.setdefault(r["video_id"], {"video_id": r["video_id"], "duration_category": r["duration"],
                                                  "video_category": r["domain"],
                                                  "video_subcategory": r["sub_category"], "questions": []})
            v["questions"].append({"question_id": r["question_id"], "task_type": r["task_type"],
                                   "question": r["question"], "choices": r["options"], "answer": r["answer"]})
        (folder / "questions.json").write_text(json.dumps(list(videos.values())))
    return folder


def jsonl_file(folder):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "p.png").write_bytes(png())
    recs = [
        {"id": "doc-1", "images": ["img/p.png"], "meta": {"regions": [{"level": "low"}]},
         "messages": [{"role": "user", "content": "Read the page.\n(<image>./</image>)"},
                      {"role": "assistant", "content": "hello world"}]},
        {"id": "q-2", "messages": [{"role": "user", "content": "2 + 2?"}], "answer": ["4", "four"],
         "verifier": "string", "category": "math"},
        {"id": "q-3", "messages": [{"role": "user", "content": "(<image>./</image>)\nWhat?"}], "images": [],
         "answer": "x"},  # a marker without its image
    ]
    lines = [json.dumps(r) for r in recs] + ["{not json"]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class Scripted:
    """A backend answering from the prompt's text: `answers` maps a substring of the prompt to the reply; the prompts
    in `fail` get a generation error. Records every batch it was asked."""

    describe = {"kind": "scripted"}
    knobs_note = "none given"

    def __init__(self, answers=None, fail=()):
        self.answers, self.fail, self.batches = answers or {}, fail, []

    def generate(self, requests):
        self.batches.append(requests)
        outs = []
        for messages, seed in requests:
            text = " ".join(p if isinstance(p, str) else p.get("text", "") for m in messages
                            for p in ([m["content"]] if isinstance(m["content"], str) else m["content"]))
            if any(f in text for f in self.fail):
                outs.append(Output(error="RuntimeError: scripted failure"))
                continue
            reply = next((a for k, a in self.answers.items() if k in text), "no idea")
            outs.append(Output(reply, "", "stop", 30, 8, 2, 0.01, 0.1, 0.2))
        return outs

    def memory(self):
        return {"cpu_peak_rss_mb": 100.0}


def evaluate(tmp_path, task, data, backend, out="out", **kw):
    return run(EvalConfig(task=task, data=str(data), out=str(tmp_path / out), **kw), backend=backend,
               progress=False)


# ---- readers ----------------------------------------------------------------------------------------------------
def test_tsv_layout(tmp_path):
    task = make_task("mcq")
    items = task.load(mcq_tsv(tmp_path / "m.tsv"), None)
    assert [it.id for it in items] == ["0", "1", "2", "3", "4"]
    assert items[0].row["question"] == "What colour\tis the\nbackground?"  # quoted tab / newline kept
    assert task.choices(items[1].row) == {"A": "red", "B": "green"}  # "None" is NaN to pandas: no option C
    assert items[3].error is not None and "question" in items[3].error
    msgs = task.messages(items[1])
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    image, text = msgs[0]["content"]
    assert Image.open(io.BytesIO(image["image"])).getpixel((1, 1)) == (0, 200, 0)
    assert text == ("Hint: Look closely.\nQuestion: What colour is the background?\nOptions:\nA. red\nB. green\n"
                    "\nAnswer with the option's letter from the given choices directly.")
    shared = task.messages(items[2])[0]["content"][0]["image"]  # "0": row 0's image
    assert shared == base64.b64decode(items[0].row["image"])


def test_image_path_layout(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    path = write_tsv(tmp_path / "p.tsv", ["index", "image_path", "question", "A", "B", "answer"],
                     [[0, "imgs/a.png", "Q?", "x", "y", "A"], [1, "['imgs/a.png', 'imgs/a.png']", "Q?", "x", "y", "B"],
                      [2, "imgs/missing.png", "Q?", "x", "y", "A"]])
    task = make_task("mcq")
    items = task.load(path, None)
    assert task.messages(items[0])[0]["content"][0] == {"type": "image", "image": str(tmp_path / "imgs" / "a.png")}
    assert len(task.messages(items[1])[0]["content"]) == 3  # two images + the text
    with pytest.raises(ValueError, match="missing.png"):
        task.messages(items[2])


def test_tsv_without_index_column(tmp_path):
    path = write_tsv(tmp_path / "x.tsv", ["question", "answer"], [["q", "a"]])
    with pytest.raises(ValueError, match="index"):
        make_task("mcq").load(path, None)


def test_ocrbench_and_vqa_tsv(tmp_path):
    img = b64(png())
    ocr = write_tsv(tmp_path / "o.tsv", ["index", "image", "question", "answer", "category"], [
        [0, img, "What is written?", "['CENTRE', 'center']", "Regular Text Recognition"],
        [1, img, "What is written?", "['x^{2}']", "Handwritten Mathematical Expression Recognition"],
        [2, img, "What?", "['a']", "Not A Category"]])
    backend = Scripted({"What is written?": "The word is Centre."})
    s = evaluate(tmp_path, "ocrbench", ocr, backend)
    assert (s["overall"], s["n"], s["errors"]) == (1, 3, 1)
    assert s["by"]["group"]["Text Recognition"] == {"score": 1, "n": 1}
    first = backend.batches[0][0][0][0]["content"]
    assert first[0] == "Answer the question using a single word or phrase." and first[2] == "What is written?"

    doc = write_tsv(tmp_path / "d.tsv", ["index", "image", "question", "answer"],
                    [[0, img, "Date?", "['1999', '1999-01-01']"], [1, img, "Total?", "['$40']"]])
    s = evaluate(tmp_path, "docvqa", doc, Scripted({"Date?": "1999", "Total?": "$4"}), out="doc")
    assert s["overall"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # "$4" vs "$40": NL 1/3
    tv = write_tsv(tmp_path / "t.tsv", ["index", "image", "question", "answer"],
                   [[0, img, "Brand?", str(["coke"] * 2 + ["pepsi"] * 8)]])
    s = evaluate(tmp_path, "textvqa", tv, Scripted({"Brand?": "Coke."}), out="tv")
    assert s["overall"] == pytest.approx(60.0)  # 2 of 10 humans


@pytest.mark.parametrize("fmt", ["parquet", "json", "jsonl"])
def test_videomme_files(tmp_path, fmt):
    folder = videomme_dir(tmp_path / "vmme", fmt)
    task = make_task("videomme")
    items = {it.id: it for it in task.load(folder, None)}
    assert sorted(items) == ["001-1", "001-2", "002-1"]
    assert items["001-1"].meta["duration"] == "short" and items["002-1"].meta["domain"] == "Life Record"
    assert items["001-2"].error is not None  # no options
    video, text = task.messages(items["001-1"])[0]["content"]
    assert video == {"type": "video", "video": str(folder / "data" / ("001.mp4" if fmt == "json" else "clipA.mp4"))}
    assert text.startswith("Select the best answer") and "\nA. One.\nB. Two.\nC. Three.\nD. Six.\n" in text
    assert text.endswith("The best answer is:")
    with pytest.raises(ValueError, match="no video file for"):
        task.messages(items["002-1"])


def test_videomme_scores_by_duration(tmp_path):
    folder = videomme_dir(tmp_path / "vmme", "jsonl")
    s = evaluate(tmp_path, "videomme", folder / "questions.jsonl", Scripted({"How many": "The answer is D"}))
    assert (s["n"], s["errors"]) == (3, 2)  # a missing video and missing options: errors, in the denominator
    assert s["overall"] == pytest.approx(100 / 3)
    assert s["by"]["duration"] == {"long": {"score": 0.0, "n": 1}, "short": {"score": 50.0, "n": 2}}
    assert (s["answered_n"], s["answered_overall"]) == (1, 100.0)  # the official script's denominator


def test_jsonl_records(tmp_path):
    path = jsonl_file(tmp_path)
    task = make_task("jsonl")
    items = task.load(path, None)
    assert [it.id for it in items] == ["doc-1", "q-2", "q-3", "data.jsonl:4"]
    assert items[0].meta["answer"] == "hello world" and items[0].meta["category"] == "low"
    assert items[1].meta["answer"] == ["4", "four"] and items[3].error is not None
    assert task.messages(items[0]) == [{"role": "user", "content": [
        "Read the page.", {"type": "image", "image": str(tmp_path / "img" / "p.png")}]}]
    with pytest.raises(ValueError, match="image markers"):
        task.messages(items[2])


def test_inline_images_absorbs_one_newline():
    msgs = inline_images([{"role": "user", "content": "(<image>./</image>)\nQ?\n(<image>./</image>)"}], ["a", "b"])
    assert msgs[0]["content"] == [{"type": "image", "image": "a"}, "Q?", {"type": "image", "image": "b"}]


def test_jsonl_cer_corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "messages": [{"role": "user", "content": q},
                                                                     {"role": "assistant", "content": ref}]})
                              for i, (q, ref) in enumerate([("one", "abcd"), ("two", "abcdefgh")])) + "\n")
    s = evaluate(tmp_path, "jsonl", path, Scripted({"one": "abce", "two": "zzz"}, fail=()), verifier="cer")
    # corpus CER: (1 + 8 edits) / (4 + 8 characters)
    assert s["overall"] == pytest.approx(9 / 12) and s["metric"].startswith("CER")


# ---- the runner -----------------------------------------------------------------------------------------------------
def test_run_writes_records_and_keeps_errors(tmp_path):
    data = mcq_tsv(tmp_path / "m.tsv")
    backend = Scripted({"background?": "A", "Same picture": "B"}, fail=("Broken",))
    s = evaluate(tmp_path, "mcq", data, backend, batch_size=2)
    assert (s["n"], s["errors"]) == (5, 2)  # missing question; undecodable image (data errors)
    assert s["overall"] == pytest.approx(100 / 5)  # row 0 right ("A"); row 1 says A for B; row 2 says B for A
    assert s["by"]["split"] == {"dev": {"score": 50.0, "n": 2}, "test": {"score": 0.0, "n": 3}}
    assert [len(b) for b in backend.batches] == [2, 1]  # rows 3 and 4 never reach the backend
    recs = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["0", "1", "2", "3", "4"]
    r0 = recs[0]
    assert (r0["output"], r0["extracted"], r0["score"], r0["answer"], r0["category"]) == ("A", "A", 1.0, "A", "colour")
    assert r0["usage"] == {"prompt_tokens": 30, "visual_tokens": 8, "generated_tokens": 2}
    assert r0["seconds"] == {"preprocess": 0.01, "prefill": 0.1, "decode": 0.2}
    assert r0["prompt"].startswith("<image> Question: What colour is the background?")
    assert recs[4]["error_stage"] == "data" and "base64" in recs[4]["error"]
    e = s["efficiency"]
    assert e["samples_generated"] == 3 and e["visual_tokens"] == {"total": 24, "mean": 8.0}
    assert e["prefill_s"]["batch_total"] == pytest.approx(0.2)  # two batches, each prefilled once
    assert e["peak_memory"] == {"cpu_peak_rss_mb": 100.0}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "accuracy (%): **20.00** over 5 samples" in report and "| dev | 50.00 | 2 |" in report


def test_resume_skips_answered_and_retries_errors(tmp_path):
    data = mcq_tsv(tmp_path / "m.tsv")
    evaluate(tmp_path, "mcq", data, Scripted({"background?": "A"}, fail=("Same picture",)), limit=3)
    again = Scripted({"background?": "A", "Same picture": "A"})
    s = evaluate(tmp_path, "mcq", data, again, limit=4)  # --limit may grow
    asked = [m[0]["content"][-1] for batch in again.batches for m, _ in batch]
    assert len(asked) == 1 and "Same picture" in asked[0]  # only the failed one (row 3 is a data error)
    assert s["n"] == 4 and s["efficiency"]["sessions"] == 2
    again = Scripted()
    evaluate(tmp_path, "mcq", data, again, limit=4)
    assert again.batches == []  # all answered; row 3 (no question) is retried but never reaches a backend
    preds = read_predictions(tmp_path / "out" / "predictions.jsonl")
    assert preds["2"]["score"] == 1.0 and len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 4


def test_rerun_with_other_settings_is_refused(tmp_path):
    data = mcq_tsv(tmp_path / "m.tsv")
    evaluate(tmp_path, "mcq", data, Scripted(), limit=1)
    with pytest.raises(ValueError, match="video_packing"):
        evaluate(tmp_path, "mcq", data, Scripted(), limit=1, video_packing=2)


def test_torn_last_line_is_ignored(tmp_path):
    data = mcq_tsv(tmp_path / "m.tsv")
    evaluate(tmp_path, "mcq", data, Scripted({"background?": "A"}), limit=2)
    pred = tmp_path / "out" / "predictions.jsonl"
    pred.write_text(pred.read_text() + '{"id": "2", "out')
    assert set(read_predictions(pred)) == {"0", "1"}


def test_compare_table(tmp_path):
    data = mcq_tsv(tmp_path / "m.tsv")
    evaluate(tmp_path, "mcq", data, Scripted({"background?": "A"}), out="a", limit=2)
    evaluate(tmp_path, "mcq", data, Scripted({"background?": "B"}), out="b", limit=2, video_packing=6)
    table = compare([str(tmp_path / "a"), str(tmp_path / "b")])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | task | backend | video knobs")
    assert "| packing=6 |" in lines[3] and "| 50.00 |" in lines[2] and "| 50.00 |" in lines[3]
    with pytest.raises(FileNotFoundError, match="scores.json"):
        compare([str(tmp_path / "nowhere")])


def test_cli_errors(tmp_path, capsys):
    assert main(["eval", "--task", "mcq", "--data", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    data = mcq_tsv(tmp_path / "m.tsv")
    assert main(["eval", "--task", "mcq", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--verifier", "number"]) == 2
    assert "--verifier only applies" in capsys.readouterr().err
    assert main(["eval", "--task", "mcq", "--data", str(data), "--out", str(tmp_path / "o"), "--model",
                 str(tmp_path / "m"), "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["eval", "--task", "mcq", "--data", str(data), "--out", str(tmp_path / "o"), "--model",
                 str(tmp_path / "no_model")]) == 2
    assert "no model checkpoint" in capsys.readouterr().err
    assert main(["eval", "--task", "mcq", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--endpoint", "http://127.0.0.1:9"]) == 2  # nothing listens on port 9
    assert "cannot reach" in capsys.readouterr().err
