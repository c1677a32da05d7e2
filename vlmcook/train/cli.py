"""`vlmcook train`: one stage of the recipe on JSONL data (see docs/training.md).

    vlmcook train --stage pt1 --preset tiny --data caps.jsonl --out runs/pt1 --steps 200
    vlmcook train --stage sft --init runs/pt3/step-2000 --data sft.jsonl:0.9 --data text.jsonl:0.1 --out runs/sft
    vlmcook train --config sft.json --steps 500       # any flag as a JSON key; the command line wins
    torchrun --nproc_per_node 8 -m vlmcook.cli train --dist fsdp ...

Flags are generated from the fields of TrainConfig (vlmcook/train/loop.py), Start and Data, so Python code uses the
same names. Under torchrun each process reads its own share of the data mixture: --batch-size is per process.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from vlmcook.train import common as C
from vlmcook.train import flags
from vlmcook.train.flags import opt
from vlmcook.train.loop import TrainConfig, train


@dataclass(frozen=True)
class Data:
    """The training data of `vlmcook train` and how its samples become micro-batches."""

    data: tuple[str, ...] = opt((), "SFT JSONL file with an optional mixture weight (default 1); repeat for a "
                                    "mixture", required=True, action="append", metavar="FILE.jsonl[:WEIGHT]")
    pack: int | None = opt(None, "pack each micro-batch's samples into rows of at most TOKENS", metavar="TOKENS")
    max_length: int | None = opt(None, "skip samples longer than N tokens (counted in the log)")
    strict: bool = opt(False, "stop at the first bad record instead of skipping it")

    def __post_init__(self):
        for name in ("pack", "max_length"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name}={v!r}: must be a number of tokens >= 1 (or unset)")


def _per_stage(name: str) -> str:
    """The shown default of a field that STAGES sets, e.g. 'per stage: pt1/pt2/pt3 5e-05, sft 1e-05'."""
    by_value: dict = {}
    for stage, s in C.STAGES.items():
        by_value.setdefault(getattr(s, name), []).append(stage)
    return "default per stage: " + ", ".join(f"{'/'.join(v)} {k}" for k, v in by_value.items())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help=f"run one training stage ({'/'.join(C.STAGES)}), optionally with LoRA",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shown = {k: _per_stage(k) for k in ("lr", "min_lr", "schedule")}
    flags.add_flags(p, TrainConfig, C.Start, Data, default_text={**shown, "dist": "default: ddp under torchrun, "
                                                                                 "else none"})
    p.set_defaults(fn=run)
    return p


def parse_data(specs: list[str]) -> list[tuple[Path, float]]:
    """`FILE[:WEIGHT]` -> (path, weight); a suffix that is not a number is part of the file name."""
    out = []
    for spec in specs:
        path, _, w = spec.rpartition(":")
        try:
            weight = float(w) if path else 1.0
        except ValueError:
            path, weight = spec, 1.0
        path = Path(path or spec)
        if not path.is_file():
            raise FileNotFoundError(f"--data {spec}: no such file {path}")
        if weight < 0:
            raise ValueError(f"--data {spec}: weight must be >= 0")
        out.append((path, weight))
    return out


def _batches(mixture, dist, batch_size: int, pad_id: int, pack_tokens: int | None):
    from vlmcook.train.data import collate_batch, pack

    def source(position: int):
        # Rank r of W reads mixture positions r, r+W, ...; its micro-batch k holds its samples k*B .. k*B+B-1, so
        # the data position a checkpoint saves is just k.
        it = mixture.iterate(start=position * batch_size * dist.world_size, rank=dist.rank,
                             world_size=dist.world_size)
        while True:
            samples = [next(it)[1] for _ in range(batch_size)]
            yield pack(samples, pack_tokens, pad_id) if pack_tokens else collate_batch(samples, pad_id)
    return source


def run(args) -> int:
    from vlmcook.train.data import JsonlSource, Mixture

    values = flags.values(args, TrainConfig, C.Start, Data)
    dist = C.setup_distributed()
    values.setdefault("dist", "ddp" if dist.enabled else "none")
    cfg, data, start = (flags.build(cls, values) for cls in (TrainConfig, Data, C.Start))
    files = parse_data(data.data)
    model, tokenizer = C.load_or_init(start.init, start.preset, start.tokenizer, seed=cfg.seed)
    sources = [(JsonlSource(p, tokenizer, model.config, strict=data.strict, max_length=data.max_length), w)
               for p, w in files]
    mixture = Mixture(sources, seed=cfg.seed)
    batches = _batches(mixture, dist, cfg.batch_size, tokenizer.pad_id, data.pack)
    try:
        history = train(cfg, model, batches, dist=dist, tokenizer=tokenizer)
    finally:
        for src, _ in sources:
            if src.skips.total:
                C.print0(f"skipped records in {src.records.path}: {src.skips.summary()}")
        C.cleanup_distributed()
    if history:
        C.print0(f"done: {len(history)} steps, loss {history[0]:.4f} -> {history[-1]:.4f}; checkpoint in "
                 f"{Path(cfg.out_dir) / 'latest'}")
    return 0
