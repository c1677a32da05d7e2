"""Training data: JSONL records (skips with reasons, strict errors with file:line), the seeded mixture (weights,
resume, ranks), right-padded batches, and sequence packing (a packed row == its samples run separately)."""

import itertools
import json
import math

import pytest
import torch
from PIL import Image

from vlmcook.config import MiniCPMVConfig
from vlmcook.data.processor import Processor
from vlmcook.data.synth_images import SynthImageQA, SynthText
from vlmcook.data.synth_video import SynthVideoQA
from vlmcook.data.tokenizer import Tokenizer
from vlmcook.model.minicpmv import MiniCPMV
from vlmcook.train.data import (DataError, JsonlSource, ListRecords, Mixture, RecordSource, collate_batch, pack,
                                pack_rows)

CFG = MiniCPMVConfig.from_name("tiny")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.tiny()


def _line(i, images=(), content="What is this?", answer="a thing", **extra):
    marks = "".join("(<image>./</image>)\n" for _ in images)
    return json.dumps({"id": f"s{i}", "images": list(images), "messages": [
        {"role": "user", "content": marks + content}, {"role": "assistant", "content": answer}], **extra})


@pytest.fixture
def jsonl(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    lines = [
        _line(0, ["ok.png"]),                                    # 1 good
        "{this is not json",                                     # 2 bad_json
        "",                                                      # 3 blank: ignored
        _line(3, ["missing.png"]),                               # 4 image (no such file)
        _line(4, ["broken.png"]),                                # 5 image (undecodable)
        json.dumps({"id": "v", "videos": [{"path": "broken.mp4"}], "messages": [
            {"role": "user", "content": "(<video>./</video>)\nQ?"}, {"role": "assistant", "content": "A"}]}),  # 6
        _line(6, [], content="word " * 300),                     # 7 too_long
        json.dumps({"id": "x", "messages": [{"role": "user", "content": "no answer"}]}),  # 8 bad_record
        _line(8, ["ok.png", "ok.png"]),                          # 9 good, two images
        _line(9, ["ok.png"], content="no marker", answer="x").replace("(<image>./</image>)\\n", ""),  # 10 bad_record
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_skips_are_counted_with_reason_and_line(jsonl, tok):
    src = JsonlSource(jsonl, tok, CFG, max_length=200)
    assert len(src) == 9  # the blank line is not a record
    got = [src[i] for i in range(len(src))]
    assert [g is not None for g in got] == [True, False, False, False, False, False, False, True, False]
    assert dict(src.skips.counts) == {"bad_json": 1, "image": 2, "video": 1, "too_long": 1, "bad_record": 2}
    wheres = {(r, w) for r, w, _ in src.skips.entries}
    for reason, line in [("bad_json", 2), ("image", 4), ("image", 5), ("video", 6), ("too_long", 7),
                         ("bad_record", 8), ("bad_record", 10)]:
        assert (reason, f"{jsonl}:{line}") in wheres
    assert "skipped 7 records" in src.skips.summary()
    # A good record is what the processor makes of the same conversation with the image given directly.
    direct = Processor(tok, CFG)([{"role": "user", "content": "(<image>./</image>)\nWhat is this?"},
                                  {"role": "assistant", "content": "a thing"}],
                                 [Image.open(jsonl.parent / "ok.png")], add_generation_prompt=False)
    assert torch.equal(got[0]["input_ids"], direct["input_ids"])
    assert torch.equal(got[0]["labels"], direct["labels"])
    assert (got[0]["labels"] != -100).sum() > 0


@pytest.mark.parametrize("index,line,reason", [(1, 2, "bad_json"), (3, 5, "image"), (4, 6, "video"),
                                               (5, 7, "too_long"), (6, 8, "bad_record")])
def test_jsonl_strict_raises_with_file_and_line(jsonl, tok, index, line, reason):
    src = JsonlSource(jsonl, tok, CFG, strict=True, max_length=200)
    with pytest.raises(DataError, match=f"{jsonl}:{line}: {reason}"):
        src[index]


def test_video_record_maps_to_the_processors_video_item(tmp_path, tok):
    """A JSONL video marker becomes exactly the processor's content-list video item."""
    path = SynthVideoQA(seed=0, n=1, sample_fps=3.0, packing=2).write(tmp_path)
    rec = json.loads(path.read_text())
    sample = JsonlSource(path, tok, CFG, strict=True)[0]
    q = rec["messages"][0]["content"].split("\n", 1)[1]
    direct = Processor(tok, CFG)([
        {"role": "user", "content": [{"type": "video", "video": str(tmp_path / rec["videos"][0]["path"]),
                                      "fps": 3.0, "packing": 2}, q]},
        {"role": "assistant", "content": rec["messages"][1]["content"]}], add_generation_prompt=False)
    assert torch.equal(sample["input_ids"], direct["input_ids"])
    assert sample["temporal_ids"] == direct["temporal_ids"]
    assert max(len(p) for p in sample["temporal_ids"][0]) == 2  # packing reached the planner


# ---- mixture ---------------------------------------------------------------------------------------------------
class Fake:
    """A source whose item j is (name, j); items in `holes` are skipped records (None)."""

    def __init__(self, name, n, holes=()):
        self.name, self.n, self.holes = name, n, set(holes)

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        return None if j in self.holes else (self.name, j)


def test_mixture_frequencies_follow_weights():
    mix = Mixture([(Fake("a", 50), 0.6), (Fake("b", 7), 0.3), (Fake("c", 1000), 0.1), (Fake("d", 3), 0.0)], seed=1)
    N = 6000
    names = [mix[i][0] for i in range(N)]
    for name, w in [("a", 0.6), ("b", 0.3), ("c", 0.1)]:
        # binomial standard deviation; 4 sigma keeps a correct mixture from failing by chance
        assert abs(names.count(name) / N - w) < 4 * math.sqrt(w * (1 - w) / N), name
    assert "d" not in names
    items_b = {mix[i][1] for i in range(N) if mix[i][0] == "b"}
    assert items_b == set(range(7))  # items drawn across the whole source


def test_mixture_is_a_function_of_seed_and_position():
    srcs = [(Fake("a", 100), 1.0), (Fake("b", 100), 1.0)]
    a, b, c = Mixture(srcs, seed=5), Mixture(srcs, seed=5), Mixture(srcs, seed=6)
    assert [a[i] for i in range(200)] == [b[i] for i in reversed(range(200))][::-1]  # order of access irrelevant
    assert [a[i] for i in range(200)] != [c[i] for i in range(200)]


def test_mixture_resume_and_ranks():
    mix = Mixture([(Fake("a", 30), 2.0), (Fake("b", 30), 1.0)], seed=0)
    full = [s for _, (_, s) in zip(range(60), mix.iterate())]
    it = mix.iterate(start=24)
    assert [next(it) for _ in range(36)] == list(zip(range(24, 60), full[24:]))
    world = 3
    taken = {}
    for r in range(world):
        it = mix.iterate(start=0, rank=r, world_size=world)
        for _ in range(20):
            i, s = next(it)
            assert i not in taken and i % world == r
            taken[i] = s
    assert sorted(taken) == list(range(60)) and [taken[i] for i in range(60)] == full
    with pytest.raises(ValueError, match="rank"):
        next(mix.iterate(rank=3, world_size=3))


def test_mixture_names_an_empty_source(tmp_path, tok):
    from vlmcook.train.data import JsonlRecords

    (tmp_path / "empty.jsonl").write_text("")
    empty = RecordSource(JsonlRecords(tmp_path / "empty.jsonl"), tok, CFG)
    with pytest.raises(ValueError, match=r"positive weight is empty \(.*empty\.jsonl\)"):
        Mixture([(Fake("a", 5), 1.0), (empty, 0.5)], seed=0)
    with pytest.raises(ValueError, match=r"positive weight is empty \(Fake\)"):
        Mixture([(Fake("b", 0), 1.0)], seed=0)
    Mixture([(Fake("a", 5), 1.0), (empty, 0.0)], seed=0)  # an empty source with weight 0 is allowed


def test_mixture_redraws_skipped_records():
    holes = set(range(0, 100, 2))
    mix = Mixture([(Fake("a", 100, holes), 1.0)], seed=3)
    got = [mix[i] for i in range(300)]
    assert all(s is not None and s[1] not in holes for s in got)
    assert got == [Mixture([(Fake("a", 100, holes), 1.0)], seed=3)[i] for i in range(300)]
    with pytest.raises(DataError, match="all skipped"):
        Mixture([(Fake("a", 5, range(5)), 1.0)], seed=0)[0]


def test_mixture_rejects_bad_weights():
    with pytest.raises(ValueError):
        Mixture([(Fake("a", 3), 0.0)], seed=0)
    with pytest.raises(ValueError):
        Mixture([(Fake("a", 0), 1.0)], seed=0)


# ---- batches and packing ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples(tok):
    imgs = RecordSource(ListRecords(SynthImageQA(seed=0, n=4), "img"), tok, CFG, strict=True)
    text = RecordSource(ListRecords(SynthText(seed=0, n=4), "txt"), tok, CFG, strict=True)
    vids = RecordSource(ListRecords(SynthVideoQA(seed=0, n=1, tasks=("at_time",), sample_fps=1.0, packing=2),
                                    "vid"), tok, CFG, strict=True)
    return [imgs[0], text[0], vids[0], imgs[1], text[1], text[2]]


def test_collate_batch_right_pads(samples, tok):
    batch = collate_batch(samples[:3], tok.pad_id)
    lens = [s["input_ids"].shape[1] for s in samples[:3]]
    assert batch["input_ids"].shape == (3, max(lens))
    for b, n in enumerate(lens):
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (max(lens) - n)
        assert (batch["labels"][b, n:] == -100).all() and (batch["input_ids"][b, n:] == tok.pad_id).all()
        assert torch.equal(batch["labels"][b, :n], samples[b]["labels"][0])
        assert torch.equal(batch["image_bound"][b], samples[b]["image_bound"][0])


def test_pack_rows_first_fit():
    assert pack_rows([5, 4, 3, 6, 1], 10) == [[0, 1, 4], [2, 3]]
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        pack_rows([3, 11], 10)


def _separate(model, s):
    """Logits of one sample alone, and its summed next-token cross-entropy over labelled positions (by hand)."""
    logits = model(**{k: s[k] for k in ("input_ids", "attention_mask", "pixel_values", "temporal_ids",
                                        "image_bound")}).logits[0]
    targets = s["labels"][0, 1:]
    keep = targets != -100
    loss_sum = torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum")
    return logits, loss_sum, int(keep.sum())


def test_packed_rows_equal_samples_run_separately(samples, tok):
    torch.manual_seed(0)
    model = MiniCPMV(CFG).eval()
    max_tokens = max(s["input_ids"].shape[1] for s in samples) + 60
    batch = pack(samples, max_tokens, pad_id=tok.pad_id)
    assert len(batch["rows"]) < len(samples)  # something was actually packed
    assert (batch["segment_ids"].max(1).values > 1).any()
    assert any(not views for views in batch["pixel_values"])  # a text-only row beside rows with visuals
    with torch.no_grad():
        keys = ("input_ids", "pixel_values", "temporal_ids", "image_bound", "position_ids", "segment_ids")
        logits = model(**{k: batch[k] for k in keys}).logits
        packed = model(**{k: batch[k] for k in keys + ("labels",)})
        sep = [_separate(model, s) for s in samples]
    for b, row in enumerate(batch["rows"]):
        t = 0
        for i in row:
            n = samples[i]["input_ids"].shape[1]
            torch.testing.assert_close(logits[b, t:t + n], sep[i][0], rtol=0, atol=2e-5)
            t += n
    assert packed.num_label_tokens == sum(n for _, _, n in sep)
    torch.testing.assert_close(packed.loss, sum(l for _, l, _ in sep) / packed.num_label_tokens, rtol=1e-5,
                               atol=1e-6)


def test_packed_text_only_rows_and_gradients(samples, tok):
    torch.manual_seed(0)
    model = MiniCPMV(CFG)
    text = [samples[1], samples[4], samples[5]]
    batch = pack(text, 10_000, pad_id=tok.pad_id)
    assert batch["segment_ids"].shape[0] == 1 and batch["pixel_values"] == [[]]
    keys = ("input_ids", "pixel_values", "temporal_ids", "image_bound", "position_ids", "segment_ids", "labels")
    loss = model(**{k: batch[k] for k in keys}).loss
    loss.backward()
    g_packed = model.llm.lm_head.weight.grad.clone()
    model.zero_grad()
    padded = collate_batch(text, tok.pad_id)
    ref = model(**{k: padded[k] for k in ("input_ids", "attention_mask", "pixel_values", "temporal_ids",
                                           "image_bound", "labels")}).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_packed, model.llm.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


def test_segment_mask_and_positions_by_hand():
    from vlmcook.model.llm import segment_mask, segment_positions

    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist()[0][:5] == [0, 1, 0, 1, 2]
    assert segment_positions(seg).tolist()[1] == [0, 1, 2, 3, 4, 5]
    m = segment_mask(seg)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [0, 0, 1, 0, 0, 0],
                 [0, 0, 1, 1, 0, 0],
                 [0, 0, 1, 1, 1, 0],
                 [0, 0, 0, 0, 0, 1]]  # the pad query sees only itself (no empty softmax row)
    assert torch.equal(segment_mask(seg)[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_background_batches_equal_in_process_ones():
    """in_background: the same micro-batches, in the same order, from a worker process (a resumed position too)."""
    from vlmcook.train.data import in_background

    def batches(position):
        for k in itertools.count(position):
            g = torch.Generator().manual_seed(k)
            yield {"input_ids": torch.randint(0, 100, (2, 5), generator=g), "pixel_values": [[torch.rand(3, 4, 4, generator=g)]]}

    for start in (0, 7):
        here, there = batches(start), in_background(batches)(start)
        for _ in range(5):
            a, b = next(here), next(there)
            assert torch.equal(a["input_ids"], b["input_ids"])
            assert torch.equal(a["pixel_values"][0][0], b["pixel_values"][0][0])


def test_a_training_video_reaches_the_model_as_at_inference(tok, tmp_path):
    """A video record through the training path (JSONL -> RecordSource -> pack) and the same video + question
    through the inference path (processor with a generation prompt) give the same temporal ids, the same pixels and
    the same prompt ids up to the answer; the labels are exactly the answer and its end token."""
    from vlmcook.data.chat import IGNORE_INDEX

    src = SynthVideoQA(seed=4, n=2, size=(112, 56), fps=6.0)
    path = src.write(tmp_path, n=1)
    rec = json.loads(path.read_text().splitlines()[0])
    rec["videos"][0].update(fps=4.0, packing=4)
    path.write_text(json.dumps(rec) + "\n")
    train = JsonlSource(path, tok, CFG)[0]
    batch = pack([train], 4096, tok.pad_id)
    proc = Processor(tok, CFG)
    video = {"type": "video", "video": str(tmp_path / rec["videos"][0]["path"]), "fps": 4.0, "packing": 4}
    question = rec["messages"][0]["content"].split("\n", 1)[1]
    infer = proc([{"role": "user", "content": [video, question]}], thinking=False)
    assert batch["temporal_ids"][0] == infer["temporal_ids"][0] and len(infer["temporal_ids"][0]) > 1
    assert all(max(p) - min(p) <= 10 for p in infer["temporal_ids"][0])  # 4 frames of one second per package
    assert all(torch.equal(a, b) for a, b in zip(batch["pixel_values"][0], infer["pixel_values"][0]))
    n = infer["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], infer["input_ids"][0])
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == rec["messages"][1]["content"] + "<|im_end|>"
