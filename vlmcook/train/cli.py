"""`vlmcook train`: one stage of the recipe on JSONL data (see docs/training.md).

    vlmcook train --stage pt1 --preset tiny --data caps.jsonl --out runs/pt1 --steps 200
    vlmcook train --stage sft --init runs/pt3/step-2000 --data sft.jsonl:0.9 --data text.jsonl:0.1 --out runs/sft
    torchrun --nproc_per_node 8 -m vlmcook.cli train --dist fsdp ...

Per-stage defaults (lr, floor, schedule) follow the report; every flag overrides them. Rank r of W processes reads
mixture positions r, r+W, ...; micro-batch k of a rank holds its samples k*B .. k*B+B-1, so the data position saved
with a checkpoint is just k.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmcook.train.common import STAGES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="run one training stage (lm/pt1/pt2/pt3/sft/video3d), optionally with LoRA",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--stage", required=True, choices=STAGES,
      help="lm: LLM only (text); pt1: resampler; pt2: +vision; pt3/sft/video3d: everything")
    a("--data", action="append", required=True, metavar="FILE.jsonl[:WEIGHT]",
      help="SFT JSONL file with an optional mixture weight (default 1); repeat for a mixture")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--init", metavar="DIR", help="start from a checkpoint folder (released layout or a step-N)")
    src.add_argument("--preset", help="start from a random init of a preset config (e.g. tiny)")
    a("--tokenizer", metavar="DIR", help="tokenizer folder (default: --init's, or the built-in tiny one)")
    a("--out", required=True, help="output folder: step-N/ checkpoints and `latest`")
    a("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    a("--lr", type=float, help="peak learning rate (default per stage: pt 5e-5, sft 1e-5, video3d 5e-6)")
    a("--min-lr", type=float, help="learning rate reached at the last step (default per stage)")
    a("--schedule", choices=("wsd", "cosine", "constant"), help="default: wsd for pt*, cosine for sft/video3d")
    a("--warmup-frac", type=float, default=0.01, help="fraction of steps of linear warmup (default 0.01)")
    a("--decay-frac", type=float, default=0.1, help="WSD: fraction of steps of the final decay (default 0.1)")
    a("--batch-size", type=int, default=1, help="samples per micro-batch per process (default 1)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    a("--pack", type=int, metavar="TOKENS", help="pack each micro-batch's samples into rows of at most TOKENS")
    a("--max-length", type=int, help="skip samples longer than this many tokens (counted in the log)")
    a("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    a("--clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    a("--grad-checkpointing", action="store_true", help="recompute LLM layers in backward (saves memory)")
    a("--lora", action="store_true", help="train LoRA adapters on the LLM instead of its weights")
    a("--lora-r", type=int, default=64, help="LoRA rank (default 64, as the released finetune)")
    a("--lora-alpha", type=float, default=64.0, help="LoRA alpha (default 64)")
    a("--lora-targets", help="regex over module names to adapt (default: LLM attention q/k/v/o projections)")
    a("--dist", choices=("none", "ddp", "fsdp"), help="default: ddp under torchrun, none otherwise")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--resume", action="store_true", help="continue from --out/latest if it exists")
    a("--seed", type=int, default=0, help="seed for init, data mixture and dropout (default 0)")
    a("--log-every", type=int, default=10, help="print a log line every N steps (default 10)")
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
        # This rank's micro-batch k holds its samples k*B .. k*B+B-1 of positions rank, rank+W, ...
        it = mixture.iterate(start=position * batch_size * dist.world_size, rank=dist.rank,
                             world_size=dist.world_size)
        while True:
            samples = [next(it)[1] for _ in range(batch_size)]
            yield pack(samples, pack_tokens, pad_id) if pack_tokens else collate_batch(samples, pad_id)
    return source


def _model_and_tokenizer(args, seed: int):
    import torch

    from vlmcook.checkpoint import load_model
    from vlmcook.config import MiniCPMVConfig
    from vlmcook.data.tokenizer import Tokenizer
    from vlmcook.model.minicpmv import MiniCPMV

    if args.init:
        model = load_model(args.init, dtype="float32")  # fp32 master weights; bf16 compute comes from autocast
    else:
        torch.manual_seed(seed)  # every rank builds the same init (FSDP2 does not broadcast it)
        model = MiniCPMV(MiniCPMVConfig.from_name(args.preset))
    tok_dir = args.tokenizer
    if tok_dir is None and args.init and any((Path(args.init) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        tok_dir = args.init
    tokenizer = Tokenizer.from_dir(tok_dir) if tok_dir else Tokenizer.tiny()
    return model, tokenizer


def run(args) -> int:
    from vlmcook.train import common as C
    from vlmcook.train.data import JsonlSource, Mixture
    from vlmcook.train.loop import STAGE_DEFAULTS, TrainConfig, train

    dist = C.setup_distributed()
    defaults = STAGE_DEFAULTS[args.stage]
    overrides = dict(lr=args.lr, min_lr=args.min_lr, schedule=args.schedule)
    lora = {"lora_targets": args.lora_targets} if args.lora_targets else {}
    cfg = TrainConfig(
        stage=args.stage, steps=args.steps, **{k: v if v is not None else defaults[k] for k, v in overrides.items()},
        warmup_frac=args.warmup_frac, decay_frac=args.decay_frac, batch_size=args.batch_size,
        grad_accum=args.grad_accum, clip=args.clip, weight_decay=args.weight_decay,
        grad_checkpointing=args.grad_checkpointing, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        dist=args.dist or ("ddp" if dist.enabled else "none"), out_dir=args.out, save_every=args.save_every,
        resume=args.resume, seed=args.seed, log_every=args.log_every, **lora)
    model, tokenizer = _model_and_tokenizer(args, args.seed)
    sources = [(JsonlSource(p, tokenizer, model.config, strict=args.strict, max_length=args.max_length), w)
               for p, w in parse_data(args.data)]
    mixture = Mixture(sources, seed=args.seed)
    batches = _batches(mixture, dist, args.batch_size, tokenizer.pad_id, args.pack)
    try:
        history = train(cfg, model, batches, dist=dist, tokenizer=tokenizer)
    finally:
        for src, _ in sources:
            if src.skips.total:
                C.print0(f"skipped records in {src.records.path}: {src.skips.summary()}")
        C.cleanup_distributed()
    if history:
        C.print0(f"done: {len(history)} steps, loss {history[0]:.4f} -> {history[-1]:.4f}; checkpoint in "
                 f"{Path(args.out) / 'latest'}")
    return 0
