"""The main job: the whole MiniCPM-V 4.5 recipe at toy scale on a CPU, then evaluation and a report.

    vlmcook demo [--quick] [--out runs/demo] [--seed 0]

1. Data: document pages (a title typed on the patch grid like a typewriter tape, corrupted at a low / medium /
   high level; `grid_page`, question before the page: `question_first`), synthetic image QA, text-only QA,
   repeat-the-text records (`CopyText`) and synthetic video QA (vlmcook/data), every view 196 x 98 px (7 x 14
   patches). Held-out sets use other seeds. Text is tokenized one token per character (`Tokenizer.tiny(chars=True)`).
2. Training, one model carried through every stage. First the parts the release gets pre-trained, here from
   scratch: `lm` (the LLM alone on repeat-the-text, standing in for pre-trained Qwen3) and `vision` (tower +
   resampler emit the LLM's embedding of the character under each query, standing in for pre-trained SigLIP;
   `pretrain_vision`). Then the report's recipe (vlmcook/train/loop.py): pt1 (resampler only), pt2 (+ vision
   tower), pt3 (everything), all Warmup-Stable-Decay; SFT (cosine) with videos at one frame per package (2D); the
   2D->3D stage on video with a random package size (1-6) and frame rate per sample.
3. Evaluation (vlmcook/eval): OCR CER per corruption level and video QA accuracy, trained vs untrained models of
   the same init seeds; 3D vs 2D packages at an equal visual-token budget.
4. `<out>/model` (released layout + tokenizer, what `vlmcook chat` loads), `<out>/<name>.md` + PNG plots,
   `<out>/metrics.json`.

Notable:
- The model is a demo-sized config (`demo_config`): bigger than the `tiny` preset. Training from scratch, so
  `init_for_scratch` shrinks the vision tower's N(0, 1) position embeddings and starts each resampler query on one
  text cell (`positional_queries`). Those, the tape pages, the character tokens, the question-first order and the
  two component stages are each a measured answer to why earlier versions of this demo never read their pages
  (docstrings of those functions); the architecture and parameter names are the release's.
- Samples are processed once into in-memory pools; a batch at position p is a pure function of (seed, stage, p):
  draws until `batch_tokens` tokens, packed into rows (train/data.pack). Learning rates are from-scratch ones
  (1e-3 range), not the report's fine-tuning ones (1e-5 range) which assume a pre-trained LLM.
- The "learned" margins are fixed in `verdicts`; the report states them.
- Measured outcome: reports/demo.md and reports/demo_quick.md.
"""

from __future__ import annotations

import json
import random
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from vlmcook.config import PRESETS, ResamplerConfig, VisionConfig

VIDEO_FPS = 5.0  # rendered rate of the synthetic videos: >= every sampling rate used, half the encoding work of 10
# lm and vision pre-train the from-scratch components (the release starts from a pre-trained Qwen3 and SigLIP);
# pt1 .. video3d are the report's recipe.
STAGES = ("lm", "vision", "pt1", "pt2", "pt3", "sft", "video3d")
SCHEDULES = {"lm": "wsd", "vision": "constant", "pt1": "wsd", "pt2": "wsd", "pt3": "wsd", "sft": "cosine",
             "video3d": "cosine"}
# Mixture weights per stage over the pools: copy (repeat a text), text (text QA), docs (OCR), images (image QA),
# video2d (SFT videos, one frame per package), video3d (random package size and frame rate).
MIXTURES = {
    "lm": {"copy": 1.0},
    "pt1": {"docs": 0.6, "images": 0.4},
    "pt2": {"docs": 0.6, "images": 0.4},
    "pt3": {"docs": 0.6, "images": 0.3, "text": 0.1},
    "sft": {"docs": 0.35, "images": 0.1, "text": 0.05, "video2d": 0.5},
    "video3d": {"docs": 0.2, "video3d": 0.8},
}


# Demo views are one 196 x 98 px page / frame = a 7 x 14 grid of 14-px patches (the processor keeps that size at
# scale_resolution 140). Page text is typed on that grid, one character per patch, on rows TEXT_ROWS.
CELL, GRID_ROWS, GRID_COLS = 14, 7, 14
VIEW_SIZE = (GRID_COLS * CELL, GRID_ROWS * CELL)
TEXT_ROWS = (1, 3, 5)


def demo_config():
    """Demo-sized model: 3-layer 128-wide Qwen3, 2-layer 64-wide SigLIP, 42 queries (one per text cell: rows
    TEXT_ROWS x 14 columns), single 140-px-scale views (a 196 x 98 page stays 7 x 14 patches)."""
    tiny = PRESETS["tiny"]
    vision = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    llm = replace(tiny.llm, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32)
    resampler = ResamplerConfig(num_queries=len(TEXT_ROWS) * GRID_COLS, embed_dim=128, num_heads=4, kv_dim=64)
    return replace(tiny, vision=vision, llm=llm, resampler=resampler, scale_resolution=140, max_slice_nums=1)


def grid_cells(n: int) -> list[tuple[int, int]]:
    """The (row, column) patch cell each of n queries starts looking at: TEXT_ROWS x columns, row-major."""
    cells = [(r, c) for r in TEXT_ROWS for c in range(GRID_COLS)]
    return [cells[i % len(cells)] for i in range(n)]


def init_for_scratch(model) -> None:
    """Initialisation for training from scratch (the release starts from a trained SigLIP and resampler).

    - Vision position embeddings at N(0, 0.02) instead of PyTorch's N(0, 1): with a 64-wide tower the unit-variance
      table would drown the patch embeddings (~0.1 scale) for the first thousands of steps.
    - Resampler queries that each start attending to one patch cell (`positional_queries`). With the reference
      init the 42 queries attend almost uniformly, i.e. each sees the mean of the page's patches, where one glyph's
      signal is ~1% of the background's; measured (a probe predicting a title's first 12 characters from the
      queries' outputs, 400 steps; benchmarks/bench_reading_probe.py): 0.13 held-out character accuracy with the
      reference init, 0.39 with this one (tape-typed pages).
    """
    torch.nn.init.normal_(model.vpm.embeddings.position_embedding.weight, std=0.02)
    positional_queries(model.resampler, grid_cells(model.resampler.cfg.num_queries))


@torch.no_grad()
def positional_queries(resampler, cells, sharpness: float = 3.0, content_gain: float = 0.05) -> None:
    """Make query i attend to patch cell cells[i] = (row, col) through the keys' 2-D sincos position embedding.

    keys = ln_kv(kv_proj(x)) + [sincos(col) | sincos(row)]; each axis half is [sin(p w_k) | cos(p w_k)] with
    w_k = 10000^(-k/(D/4)), and only the first few (highest) frequencies vary across a 14-cell view. So each head's
    query/key projection picks those dims, `f` frequencies per axis (sin and cos), f = head_dim / 4, scaled by
    `sharpness` (the logit gap to a neighbouring cell grows as sharpness^2); the query vector holds the position
    embedding of its cell in the same dims; `content_gain` scales ln_kv so patch content does not swamp the
    positions at first. Values and every other weight keep the reference init; all of it is trained afterwards.
    """
    import numpy as np

    from vlmcook.model.resampler import _sincos_1d

    D, H = resampler.cfg.embed_dim, resampler.cfg.num_heads
    hd, quarter = D // H, D // 4
    f = min(hd // 4, quarter // 2)
    # dims of [col sin | col cos | row sin | row cos], each `quarter` wide: the first f of each
    dims = [a * quarter + k for a in range(4) for k in range(f)]
    resampler.query.zero_()
    for i, (r, c) in enumerate(cells):
        pos = np.concatenate([_sincos_1d(np.array([c], np.float32), D // 2)[0],
                              _sincos_1d(np.array([r], np.float32), D // 2)[0]])  # [D]
        resampler.query[i, dims] = torch.from_numpy(pos[dims])
        # ln_q subtracts the vector's mean: spread the opposite of the chosen dims' sum over the other dims (which
        # the projections ignore) so the chosen dims come out of ln_q unshifted, just scaled
        rest = torch.ones(D, dtype=torch.bool)
        rest[dims] = False
        resampler.query[i, rest] = -float(pos[dims].sum()) / int(rest.sum())
    w = resampler.attn.in_proj_weight  # [3D, D], rows Q | K | V
    w[:2 * D].zero_()
    for h in range(H):
        for j, d in enumerate(dims):
            w[h * hd + j, d] = sharpness  # Q
            w[D + h * hd + j, d] = sharpness  # K
    resampler.ln_kv.weight.fill_(content_gain)


@dataclass(frozen=True)
class Plan:
    name: str
    steps: dict  # stage -> optimizer steps
    docs_train: int
    docs_eval: int
    images: int
    texts: int
    videos_train: int  # per video pool (2D and 3D)
    videos_eval: int
    copies: int = 4000  # lm stage: repeat-the-text records
    glyph_pages: int = 1000  # vision stage: clean pages
    batch_tokens: int = 1024  # tokens per optimizer step (one micro-batch, packed)
    row_tokens: int = 512
    lr: dict = field(default_factory=lambda: {"lm": 3e-3, "vision": 1e-3, "pt1": 1e-3, "pt2": 1e-3, "pt3": 1e-3,
                                              "sft": 5e-4, "video3d": 5e-4})
    untrained_seeds: int = 3
    budget_packages: int = 6  # 3D vs 2D: visual budget = budget_packages * query_num tokens
    budget_packing: int = 4


PLANS = {
    "quick": Plan("demo_quick", {"lm": 600, "vision": 200, "pt1": 10, "pt2": 10, "pt3": 350, "sft": 100,
                                 "video3d": 40}, docs_train=1500, docs_eval=40, images=100, texts=60,
                  videos_train=60, videos_eval=40),
    "full": Plan("demo", {"lm": 800, "vision": 300, "pt1": 100, "pt2": 100, "pt3": 900, "sft": 600, "video3d": 300},
                 docs_train=4000, docs_eval=100, images=300, texts=150, videos_train=200, videos_eval=100),
}


def smoke_config():
    """A still smaller model for smoke tests (the `tiny` preset's widths, demo_config's view size)."""
    return replace(PRESETS["tiny"], scale_resolution=140, max_slice_nums=1)


def smoke_plan(steps: int = 2) -> Plan:
    """A seconds-long plan for tests: every stage and every eval runs, on a handful of samples."""
    return Plan("demo_smoke", {s: steps for s in STAGES}, docs_train=6, docs_eval=4, images=4, texts=4,
                videos_train=4, videos_eval=4, copies=4, glyph_pages=4, batch_tokens=400, row_tokens=400,
                untrained_seeds=2, budget_packages=2, budget_packing=2)


# ---- data ------------------------------------------------------------------------------------------------------
MONO_FONTS = (("DejaVuSansMono", "regular"), ("DejaVuSansMono", "bold"), ("LiberationMono", "regular"),
              ("LiberationMono", "bold"))


def grid_page(i: int, seed: int, text, fonts: dict):
    """Page i: a title typed on the patch grid like a typewriter tape, one character centred in each 14-px cell,
    14 per row, continuing on the next of rows TEXT_ROWS (so a word may break across rows; words that do not fit
    the 42 cells are left out of both image and text), in one of 4 monospace faces at 14-16 px, dark ink on light
    paper of random tints. -> docs.page.Page with one "title" region whose lines are the typed rows.

    Why a grid: a from-scratch 1M-parameter ViT does not learn glyphs at arbitrary offsets in minutes of CPU
    (measured: 16-way word classification from 800 rendered images, 1000 steps: 15% held-out accuracy; a small
    CNN: 99% in 300 steps). With one glyph per patch the patch embedding sees every character at one offset.
    Why a tape: character k of the text sits in cell k (k-th resampler query, `grid_cells`), so with one token
    per character (`Tokenizer.tiny(chars=True)`) reading is copying visual token k to output token k."""
    from PIL import Image, ImageDraw

    from vlmcook.data.docs.page import Line, Page, Region
    from vlmcook.data.docs.synthetic import _font

    rng = random.Random(f"demo-grid:{seed}:{i}")
    title = ""
    for word in text.sentences[i % len(text.sentences)].split():
        if len(title) + bool(title) + len(word) <= GRID_COLS * len(TEXT_ROWS):
            title += " " * bool(title) + word
    family, style = rng.choice(MONO_FONTS)
    font = _font(fonts[family][style], rng.randint(14, 16))
    paper = tuple(rng.randint(225, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    img = Image.new("RGB", VIEW_SIZE, paper)
    draw = ImageDraw.Draw(img)
    lines = []
    for row, k0 in zip(TEXT_ROWS, range(0, len(title), GRID_COLS)):
        line = title[k0:k0 + GRID_COLS]
        for k, ch in enumerate(line):
            draw.text((k * CELL + CELL // 2, row * CELL + CELL // 2), ch, font=font, fill=ink, anchor="mm")
        lines.append(Line(line, (0, row * CELL, len(line) * CELL, (row + 1) * CELL)))
    bbox = (0, lines[0].bbox[1], max(ln.bbox[2] for ln in lines), lines[-1].bbox[3])
    region = Region(title, bbox, 0, "title", tuple(lines))
    return Page(img, [region], f"demo-grid:{seed}:{i}", {"font": f"{family}-{style}", "size": font.size}).validate()


def demo_text(seed: int, n: int = 4000):
    """Titles that must be read word by word: random 3-5 word sequences over the built-in corpus's vocabulary.
    The corpus's own 40 sentences would make a title predictable from its first word (teacher forcing then puts
    almost no loss on reading: measured, a model fits them with the images blanked out)."""
    import re

    from vlmcook.data.docs.text import TextSource

    words = sorted({w for s in TextSource.builtin().sentences for w in re.findall(r"[A-Za-z]+", s)})
    rng = random.Random(f"demo-text:{seed}")
    return TextSource(tuple(" ".join(rng.choice(words) for _ in range(rng.randint(3, 5))) for _ in range(n)))


def make_docs(folder: Path, n: int, seed: int) -> tuple[Path, dict]:
    """Type + corrupt n grid pages into `folder/samples.jsonl` + `folder/images/`, as the docs pipeline does, but
    skipping (and counting, with the reason) a page whose corruption raises instead of stopping the demo."""
    from tqdm import tqdm

    from vlmcook.data.docs.corrupt import CorruptConfig
    from vlmcook.data.docs.samples import SampleConfig, make_sample, save_image
    from vlmcook.data.docs.synthetic import find_fonts

    fonts, text = find_fonts(), demo_text(seed)
    corrupt, sample = CorruptConfig(region_fraction=1.0), SampleConfig(tasks=("page",), task_weights=(1.0,))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    skipped = {}
    with open(folder / "samples.jsonl", "w", encoding="utf-8") as f:
        for i in tqdm(range(n), desc=f"pages (seed {seed})", unit="page"):
            page = grid_page(i, seed, text, fonts)
            try:
                record, cor = make_sample(page, seed, corrupt, sample)
            except (IndexError, ValueError) as e:
                skipped[page.source] = f"{type(e).__name__}: {e}"
                continue
            rel = f"images/{i:06d}.png"
            save_image(cor.image, folder / rel)
            f.write(json.dumps({**question_first(record), "images": [rel]}) + "\n")
    if skipped:
        print(f"[demo] {len(skipped)} of {n} pages skipped (corruption failed): {next(iter(skipped.items()))}")
    return folder / "samples.jsonl", skipped


def question_first(record: dict) -> dict:
    """Move the page after the question in the user turn ("<question>\\n<page>" instead of "<page>\\n<question>").

    Why: the answer then starts right after the page's last visual token, as a copied text starts right after its
    source in the `lm` stage's repeat tasks (`CopyText`). Measured (benchmarks/bench_reading_recipe.py: lm 600 +
    vision 300 + 600 docs-only pt3 steps): held-out CER 0.379 (low 0.075) with the question first, 0.869 with the
    page first, where the model emits nearly the same text for every page (5% distinct outputs)."""
    from vlmcook.data.image import IMAGE_MARKER

    user = record["messages"][0]
    text = user["content"].replace(IMAGE_MARKER + "\n", "", 1)
    return {**record, "messages": [{**user, "content": f"{text}\n{IMAGE_MARKER}"}, *record["messages"][1:]]}


class CopyText:
    """Text-only "repeat this text" records over demo titles (another seed than the pages): the copying any
    pre-trained LLM can do, which reading a page reuses (`question_first`)."""

    def __init__(self, seed: int, n: int):
        self.titles = demo_text(seed, n).sentences

    def __len__(self) -> int:
        return len(self.titles)

    def record(self, i: int) -> dict:
        t = self.titles[i]
        return {"id": f"copy-{i}", "messages": [{"role": "user", "content": f"Repeat the text.\n{t}"},
                                                {"role": "assistant", "content": t}]}


class Memo:
    """Caches `record(i)` of a seeded in-memory source (rendering + encoding a video is the expensive part)."""

    def __init__(self, source):
        self.source, self.cache = source, {}

    def __len__(self) -> int:
        return len(self.source)

    def record(self, i: int) -> dict:
        if i not in self.cache:
            self.cache[i] = self.source.record(i)
        return self.cache[i]


class Records:
    """A records adapter for train.data.RecordSource; `knobs(i)` may override the video entry's knobs."""

    def __init__(self, source, name: str, knobs=None):
        self.source, self.name, self.knobs = source, name, knobs

    def __len__(self) -> int:
        return len(self.source)

    def record(self, i: int):
        rec = dict(self.source.record(i))
        if self.knobs is not None:
            rec["videos"] = [{**rec["videos"][0], **self.knobs(i)}]
        return rec, f"{self.name}[{i}]"


def random_knobs(seed: int):
    """The 2D->3D stage: package size 1-6 and sampling rate 2-5 fps, a pure function of (seed, i)."""
    def knobs(i: int) -> dict:
        rng = random.Random(f"demo-video3d:{seed}:{i}")
        return {"packing": rng.randint(1, 6), "fps": float(rng.randint(2, 5))}
    return knobs


def pool(records, tok, cfg, root=None, desc: str = "") -> list[dict]:
    """Process every record once (skips counted by RecordSource and reported)."""
    from tqdm import tqdm

    from vlmcook.train.data import RecordSource

    src = RecordSource(records, tok, cfg, root=root, max_length=cfg.llm.max_position_embeddings)
    out = [s for s in tqdm((src[i] for i in range(len(src))), total=len(src), desc=desc, unit="sample")
           if s is not None]
    if src.skips.total:
        print(f"[demo] {desc}: {src.skips.summary()}")
    return out


def make_pools(data: Path, plan: Plan, seed: int, tok, cfg) -> tuple[dict, dict]:
    """Training pools + held-out sources. Held-out seeds: docs seed+1000, videos seed+2000."""
    from vlmcook.data.synth_images import SynthImageQA, SynthText
    from vlmcook.data.synth_video import SynthVideoQA
    from vlmcook.train.data import JsonlRecords

    docs, skip_train = make_docs(data / "docs_train", plan.docs_train, seed)
    docs_eval, skip_eval = make_docs(data / "docs_eval", plan.docs_eval, seed + 1000)
    videos = Memo(SynthVideoQA(seed=seed, n=plan.videos_train, size=VIEW_SIZE, fps=VIDEO_FPS))
    videos3d = Memo(SynthVideoQA(seed=seed + 1, n=plan.videos_train, size=VIEW_SIZE, fps=VIDEO_FPS))
    records = JsonlRecords(docs)
    pools = {"docs": pool(records, tok, cfg, records.path.parent, "docs"),
             "images": pool(Records(SynthImageQA(seed=seed, n=plan.images, size=VIEW_SIZE,
                                                 tasks=("caption", "word", "colour")), "images"),
                            tok, cfg, desc="image QA"),
             "text": pool(Records(SynthText(seed=seed, n=plan.texts), "text"), tok, cfg, desc="text QA"),
             "copy": pool(Records(CopyText(seed + 3000, plan.copies), "copy"), tok, cfg, desc="repeat-the-text"),
             "glyphs": glyph_pages(plan.glyph_pages, seed + 4000, cfg, tok),
             "video2d": pool(Records(videos, "video2d", lambda i: {"packing": 1, "fps": 2.0}), tok, cfg,
                             desc="video QA 2D"),
             "video3d": pool(Records(videos3d, "video3d", random_knobs(seed)), tok, cfg, desc="video QA 3D")}
    video_meta = [videos.record(i)["meta"] for i in range(len(videos))]
    eval_videos = Memo(SynthVideoQA(seed=seed + 2000, n=plan.videos_eval, size=VIEW_SIZE, fps=VIDEO_FPS))
    held_out = {"docs": docs_eval, "videos": eval_videos, "video_meta": video_meta,
                "skipped_pages": len(skip_train) + len(skip_eval),
                "train_texts": {s["messages"][-1]["content"] for s in _docs_records(docs)}}
    return pools, held_out


def _docs_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- batches and stages ----------------------------------------------------------------------------------------
def batches(pools: dict, mixture: dict, seed: int, stage: str, plan: Plan, pad_id: int):
    """position -> iterator of packed micro-batches; batch p is a pure function of (seed, stage, p)."""
    from vlmcook.train.data import pack

    names = [k for k in mixture if pools.get(k)]
    weights = [mixture[k] for k in names]

    def one(p: int) -> dict:
        rng = random.Random(f"demo-batch:{seed}:{stage}:{p}")
        picked, tokens = [], 0
        while tokens < plan.batch_tokens:
            s = rng.choice(pools[rng.choices(names, weights)[0]])
            picked.append(s)
            tokens += s["input_ids"].shape[1]
        return pack(picked, max(plan.row_tokens, max(s["input_ids"].shape[1] for s in picked)), pad_id)

    def iterate(position: int):
        p = position
        while True:
            yield one(p)
            p += 1
    return iterate


def glyph_pages(n: int, seed: int, cfg, tok) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The vision stage's data: n clean grid pages (titles of another seed, no corruption) as processed views
    [3, 98, 196], each with the class of the cell of every resampler query [Q] (`grid_cells`; printable ASCII - 32,
    0 = empty cell)."""
    from vlmcook.data.docs.synthetic import find_fonts
    from vlmcook.data.processor import Processor

    proc, fonts, text = Processor(tok, cfg), find_fonts(), demo_text(seed)
    cells = grid_cells(cfg.resampler.num_queries)
    out = []
    for i in range(n):
        page = grid_page(i, seed, text, fonts)
        view = proc([{"role": "user", "content": [page.image, "."]}])["pixel_values"][0][0]
        tape = page.regions[0].text.ljust(len(TEXT_ROWS) * GRID_COLS)
        out.append((view, torch.tensor([ord(tape[TEXT_ROWS.index(r) * GRID_COLS + c]) - 32 for r, c in cells])))
    return out


def pretrain_vision(model, data: list, tok, steps: int, lr: float, seed: int, batch: int = 16) -> list[dict]:
    """Stand-in for the pre-trained SigLIP (and the alignment the release's pt1 gets from hundreds of millions of
    captions): the vision tower and the resampler learn to emit, for each query, a token whose nearest input
    embedding of the (frozen, `lm`-trained) LLM is the character in the query's cell: cross-entropy over the 95
    printable characters of logits = visual token . embedding. The LLM is untouched.

    Why: without this stage the recipe's stages never make the model look at the page (benchmarks/
    bench_reading_recipe.py, lm 600 + 600 docs-only pt3 steps: held-out CER 0.844, 5% distinct outputs; with this
    stage, 300 steps: 0.379, low 0.075). A tower-only glyph classifier (a linear head on the patch features, the
    resampler left to pt1) did not do it either (scratch run, lm 600 + pt1 300 + pt2 100 + pt3 600: CER 0.88)."""
    from tqdm import tqdm

    params = [*model.vpm.parameters(), *model.resampler.parameters()]
    for q in params:
        q.requires_grad_(True)  # the lm stage froze them; the next stage sets its own
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    chars = torch.tensor([tok.encode(chr(32 + c))[0] for c in range(95)])
    emb = model.llm.model.embed_tokens.weight.detach()[chars]  # [95, D], frozen: the targets
    model.train()
    logs = []
    for step in tqdm(range(steps), desc="vision", unit="step"):
        picked = random.Random(f"demo-vision:{seed}:{step}").sample(data, min(batch, len(data)))
        tokens = model.encode_views([v for v, _ in picked], [[-1]] * len(picked))  # [B, Q, D]
        labels = torch.stack([y for _, y in picked])  # [B, Q]
        loss = torch.nn.functional.cross_entropy((tokens @ emb.T).flatten(0, 1), labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        logs.append({"loss": loss.item(), "lr": lr})
    for q in params:
        q.grad = None
    return logs


def train_stage(model, pools: dict, mixture: dict, stage: str, steps: int, lr: float, seed: int, plan: Plan,
                tok) -> list[dict]:
    """One LLM-loss stage of the demo (vlmcook/train/loop.py) on `mixture` over `pools`; -> per-step logs."""
    from vlmcook.train.loop import TrainConfig, train

    logs: list[dict] = []
    cfg = TrainConfig(stage=stage, steps=steps, lr=lr, min_lr=lr / 10, schedule=SCHEDULES[stage], warmup_frac=0.05,
                      decay_frac=0.2, batch_size=1, seed=seed, log_every=0, weight_decay=0.01)
    train(cfg, model, batches(pools, mixture, seed, stage, plan, tok.pad_id), tokenizer=tok,
          on_step=lambda step, m: logs.append(dict(m)))
    return logs


def train_stages(model, pools: dict, plan: Plan, seed: int, tok) -> dict:
    """Every stage in order on one model; -> {stage: [{"loss", "lr", ...} per step]}."""
    history = {}
    for stage in STAGES:
        steps, lr = plan.steps[stage], plan.lr[stage]
        if stage == "vision":
            print(f"[demo] vision: {steps} steps (tower + resampler -> the LLM's character embeddings)")
            history[stage] = pretrain_vision(model, pools["glyphs"], tok, steps, lr, seed)
        else:
            history[stage] = train_stage(model, pools, MIXTURES[stage], stage, steps, lr, seed, plan, tok)
    return history


# ---- evaluation ------------------------------------------------------------------------------------------------
def evaluate(model, tok, cfg, held: dict, plan: Plan, items: dict | None = None) -> tuple[dict, dict]:
    """OCR + video QA of one model; `items` (prompts) are built once and reused for every model."""
    from vlmcook.eval.ocr import eval_ocr, ocr_items
    from vlmcook.eval.video_qa import eval_video_qa, video_items

    if items is None:
        items = {"ocr": ocr_items(held["docs"], tok, cfg),
                 "video": video_items(held["videos"], range(len(held["videos"])), tok, cfg, fps=4.0,
                                      packing=plan.budget_packing)}
    max_ocr = max(len(tok.encode(it.reference)) for it in items["ocr"]) + 8
    return {"ocr": eval_ocr(model, tok, items["ocr"], max_ocr),
            "video": eval_video_qa(model, tok, items["video"])}, items


def untrained(cfg, seed: int):
    from vlmcook.model.minicpmv import MiniCPMV

    torch.manual_seed(seed)
    model = MiniCPMV(cfg)
    init_for_scratch(model)
    return model


def verdicts(trained: dict, base: list[dict], majority: float) -> dict:
    """The margins behind the report's verdicts (see the report for the reasoning).

    OCR: learned if the trained CER is below the *best* untrained seed's CER by more than max(0.10, 3 x the
    untrained seeds' standard deviation): 3 sigma of init noise, floored at 10 CER points because 2-3 seeds
    estimate sigma poorly. CERs are clipped at 1 here (1 = no character right; above 1 only measures how much
    longer than the reference an output runs): unclipped, the untrained seeds' garbage lengths (CER 1.8-3.3)
    gave a 3-sigma margin of 1.94, a bar below zero that no model could pass. Video QA: learned if the lower end
    of the trained accuracy's 95% Wilson interval is above every untrained seed (sampling noise of n answers
    cannot pass); the stronger claim "above baselines" also needs it above the uniform-chance level and the
    majority-answer baseline (what the question text alone allows: an untrained model never even emits a valid
    answer, so beating it can be format learning only)."""
    import statistics

    cers = [min(1.0, b["ocr"]["cer"]) for b in base]
    sd = statistics.pstdev(cers) if len(cers) > 1 else 0.0
    ocr_margin = max(0.10, 3 * sd)
    ocr_ok = min(1.0, trained["ocr"]["cer"]) < min(cers) - ocr_margin
    v = trained["video"]
    base_best = max(b["video"]["accuracy"] for b in base)
    bar = max(v["chance"], majority)
    # reading, judged on the trained model alone: its outputs on legible ("low") pages must match their own page's
    # text clearly better than another page's (an output that ignores the page scores the same on both)
    low = trained["ocr"]["per_level"].get("low", float("nan"))
    low_other = trained["ocr"]["per_level_other_page"].get("low", float("nan"))
    return {"ocr": {"learned": ocr_ok, "margin": ocr_margin, "untrained_best": min(cers), "untrained_sd": sd,
                    "reads": low < low_other - 0.10, "low": low, "low_other_page": low_other},
            "video": {"learned": v["ci95"][0] > base_best, "untrained_best": base_best,
                      "above_baselines": v["ci95"][0] > bar, "bar": bar, "majority": majority}}


# ---- the run ---------------------------------------------------------------------------------------------------
def run(out: str = "runs/demo", seed: int = 0, quick: bool = False, plan: Plan | None = None,
        steps: int | None = None, config=None, threads: int = 1) -> int:
    """The whole job; `plan` overrides the quick/full choice, `steps` sets every stage's step count, `config` the
    model (default demo_config()). One intra-op thread by default: at these widths (64-384) a matmul is too small
    to split, and measured on this 2-core machine two threads cost 2-5x the CPU time of one for the same
    forward + backward (and more wall time whenever the cores are shared)."""
    from vlmcook.checkpoint import save_model
    from vlmcook.data.tokenizer import Tokenizer
    from vlmcook.eval.report import write_report
    from vlmcook.eval.video_qa import compare_3d_2d, majority_baseline

    plan = plan or PLANS["quick" if quick else "full"]
    if steps is not None:
        plan = replace(plan, steps={s: steps for s in STAGES})
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), _cpu()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg, tok = config or demo_config(), Tokenizer.tiny(chars=True)
    timings = {}

    print(f"[demo] {plan.name}: data (seed {seed})")
    pools, held = make_pools(out_dir / "data", plan, seed, tok, cfg)
    timings["data"] = time.perf_counter() - t0

    model = untrained(cfg, seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] model: {n_params:,} parameters; stages " + ", ".join(f"{s} {plan.steps[s]}" for s in STAGES))
    t = time.perf_counter()
    history = train_stages(model, pools, plan, seed, tok)
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    save_model(model, out_dir / "model", tokenizer=tok)
    print("[demo] evaluating the trained model")
    trained, items = evaluate(model, tok, cfg, held, plan)
    qn = cfg.query_num
    vids = held["videos"]
    compare = compare_3d_2d(model, tok, cfg, vids, range(len(vids)), plan.budget_packages * qn, plan.budget_packing)
    base = []
    for s in range(seed, seed + plan.untrained_seeds):
        print(f"[demo] evaluating the untrained model, init seed {s}")
        base.append(evaluate(untrained(cfg, s), tok, cfg, held, plan, items)[0])
    majority = majority_baseline(held["video_meta"], items["video"])
    verdict = verdicts(trained, base, majority)
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    timings["cpu"] = _cpu() - c0

    seen = sum(it.reference in held["train_texts"] for it in items["ocr"]) / len(items["ocr"])
    results = {"plan": _plan_dict(plan), "schedules": SCHEDULES, "seed": seed, "params": n_params,
               "config": cfg.to_dict(), "history": history, "trained": _strip(trained), "untrained": [_strip(b) for b in base],
               "compare_3d_2d": _strip(compare), "verdict": verdict, "timings": timings,
               "ocr_refs_seen_in_training": seen, "skipped_pages": held["skipped_pages"],
               "pool_sizes": {k: len(v) for k, v in pools.items()}, "threads": torch.get_num_threads()}
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
    report = write_report(results, out_dir, plan.name)
    _summary(results, out_dir, report)
    return 0


def _cpu() -> float:
    """CPU seconds of this process and of finished child processes (the data workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _plan_dict(plan: Plan) -> dict:
    return asdict(plan)


def _strip(d):
    """Drop per-sample outputs (kept short in metrics.json)."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k != "outputs"}
    return d


def _summary(r: dict, out_dir: Path, report: Path) -> None:
    tr, v = r["trained"], r["verdict"]
    base_cer = [b["ocr"]["cer"] for b in r["untrained"]]
    base_acc = [b["video"]["accuracy"] for b in r["untrained"]]
    c = r["compare_3d_2d"]
    lines = [
        "",
        "=" * 78,
        f"vlmcook demo ({r['plan']['name']}) done in {r['timings']['total']:.0f} s wall, "
        f"{r['timings']['cpu']:.0f} s CPU ({r['params']:,} parameters)",
        f"  OCR CER        trained {tr['ocr']['cer']:.3f}   untrained {_rng(base_cer)}   "
        f"-> {'LEARNED' if v['ocr']['learned'] else 'not learned'} (margin {v['ocr']['margin']:.2f})",
        "  CER per level  " + ", ".join(f"{k} {x:.3f}" for k, x in tr["ocr"]["per_level"].items())
        + f"   -> {'READS' if v['ocr']['reads'] else 'does NOT read'} (low {v['ocr']['low']:.3f} vs "
        f"{v['ocr']['low_other_page']:.3f} against other pages' text)",
        f"  video QA acc   trained {tr['video']['accuracy']:.3f}   untrained {_rng(base_acc)}   chance "
        f"{tr['video']['chance']:.3f}   majority {v['video']['majority']:.3f}   "
        f"-> {'LEARNED' if v['video']['learned'] else 'not learned'}, "
        f"{'above' if v['video']['above_baselines'] else 'NOT above'} chance/majority",
        f"  3D vs 2D @ {c['budget']} visual tokens: 3D ({c['3d']['packing']} frames/package) "
        f"{c['3d']['accuracy']:.3f}   2D {c['2d']['accuracy']:.3f}",
        f"  checkpoint: {out_dir / 'model'}  (vlmcook chat loads it by default from runs/demo/model; it was "
        "trained with the question before the page: put the text first, README)",
        f"  report:     {report}",
        "=" * 78,
    ]
    print("\n".join(lines))


def _rng(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
