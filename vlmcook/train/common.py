"""Training building blocks shared by every stage: distributed setup, seeding, which parameters train, AdamW groups,
learning-rate schedules (pure functions of the step), and the small helpers the loop calls.

Notable:
- Stages follow the report (docs/reference.md R2-R3): pt1 trains the resampler only, pt2 adds the vision tower,
  pt3 / sft / video3d train everything. With LoRA the LLM's own weights stay frozen and only its
  adapters train (the vision side follows the stage), as the released LoRA finetune does.
- Schedules are pure `(step, ...) -> lr` functions; the step is the 0-based optimizer step, and the lr returned is
  the one used *for* that step. Warmup is linear from peak/W (never 0, so step 0 is not wasted) to peak.
- WSD decay is **exponential** by default: the MiniCPM paper (2404.06395) decays as `0.5^((s-T)/T_half)`; we pick
  T_half so the decay lands exactly on the floor (`min_lr`, 1e-5 in the report) at the last step, i.e. a geometric
  interpolation `peak * (floor/peak)^p`, p in (0, 1]. `decay_shape="linear"` is the alternative.
- No weight decay on 1-D tensors (norm scales, biases) nor on `resampler.query` (learned queries are embeddings,
  decaying them towards 0 only shrinks the resampler's output).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn

from vlmcook.model.lora import LoRALinear
from vlmcook.train.flags import opt


@dataclass(frozen=True)
class Stage:
    """A stage of the recipe: the top-level modules that train and the default learning-rate schedule."""

    trains: tuple[str, ...]
    schedule: str  # wsd | cosine | constant
    lr: float  # peak
    min_lr: float  # floor reached at the last step


# The report's stages (docs/reference.md R2-R3) and their schedules. "lm" is not one of them:
# text-only training of the LLM alone (the demo pre-trains its from-scratch LLM with it, standing in for the
# pre-trained Qwen3 the release starts from), at an SFT-like lr.
STAGES = {
    "lm": Stage(("llm",), "wsd", 1e-5, 1e-6),
    "pt1": Stage(("resampler",), "wsd", 5e-5, 1e-5),
    "pt2": Stage(("resampler", "vpm"), "wsd", 5e-5, 1e-5),
    "pt3": Stage(("resampler", "vpm", "llm"), "wsd", 5e-5, 1e-5),
    "sft": Stage(("resampler", "vpm", "llm"), "cosine", 1e-5, 1e-6),
    "video3d": Stage(("resampler", "vpm", "llm"), "cosine", 5e-6, 1e-6),
}
NO_DECAY_NAMES = ("resampler.query",)


# ---- processes ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; init the process group (nccl on CUDA, gloo on CPU) when
    there is more than one process. Without torchrun: one process, rank 0."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def cleanup_distributed() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum over ranks (x must live on dist.device: NCCL only reduces CUDA tensors)."""
    if dist.enabled:
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---- the model a run starts from ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    """The flags of `vlmcook train` / `vlmcook rl` that choose the model and tokenizer (see load_or_init)."""

    init: str | None = opt(None, "start from a checkpoint folder (released layout or a step-N)", metavar="DIR")
    preset: str | None = opt(None, "start from a random init of a preset config, e.g. tiny (instead of --init)")
    tokenizer: str | None = opt(None, "tokenizer folder (default: the --init folder's own, else the built-in tiny "
                                      "one when the model's vocabulary fits it)", metavar="DIR")


def load_or_init(init: str | Path | None = None, preset: str | None = None, tokenizer: str | Path | None = None,
                 seed: int = 0, dtype: str | torch.dtype = "float32"):
    """(model, tokenizer) for a run: a checkpoint folder (`init`, released layout or a step-N) or a random init of
    a preset config seeded with `seed`; the tokenizer from the `tokenizer` folder, else Tokenizer.for_model's rule.
    float32 by default: training keeps fp32 master weights (bf16 compute comes from autocast / FSDP2)."""
    from vlmcook.checkpoint import load_model, resolve_dtype
    from vlmcook.config import MiniCPMVConfig
    from vlmcook.data.tokenizer import Tokenizer
    from vlmcook.model.minicpmv import MiniCPMV

    if (init is None) == (preset is None):
        raise ValueError(f"give exactly one of init (a checkpoint folder) or preset (a config name such as 'tiny'); "
                         f"got init={init!r}, preset={preset!r}")
    if init is not None:
        if not (Path(init) / "config.json").is_file():
            raise FileNotFoundError(f"init {init}: no checkpoint there (expected config.json and *.safetensors)")
        model = load_model(init, dtype=dtype)
    else:
        torch.manual_seed(seed)  # every rank builds the same init (FSDP2 does not broadcast it)
        model = MiniCPMV(MiniCPMVConfig.from_name(preset)).to(resolve_dtype(dtype))
    tok = Tokenizer.from_dir(tokenizer) if tokenizer else Tokenizer.for_model(init, model.config.llm.vocab_size)
    return model, tok


# ---- which parameters train --------------------------------------------------------------------------------------
def set_trainable(model: nn.Module, stage: str) -> tuple[int, int]:
    """Set requires_grad for `stage`; returns (trainable, frozen) parameter counts. If the model carries LoRA
    adapters: every adapter trains, LoRA base weights never do, and the LLM's other weights stay frozen."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {tuple(STAGES)}")
    prefixes = STAGES[stage].trains
    lora_modules = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with_lora = bool(lora_modules)
    trainable = frozen = 0
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            on = True
        elif module in lora_modules or (with_lora and name.startswith("llm.")):
            on = False
        else:
            on = name.split(".", 1)[0] in prefixes
        p.requires_grad_(on)
        trainable += p.numel() if on else 0
        frozen += 0 if on else p.numel()
    return trainable, frozen


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (matrices) and a non-decayed one (norms, biases, queries)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(name == n or name.endswith("." + n) for n in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check the stage and LoRA settings")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float = 1e-8) -> torch.optim.AdamW:
    # foreach=False: the single-tensor path gives bit-identical updates whatever the parameter grouping/sharding.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=False)


# ---- learning-rate schedules (pure) -------------------------------------------------------------------------------
def _warmup(step: int, warmup: int, peak: float) -> float | None:
    return peak * (step + 1) / warmup if step < warmup else None


def wsd_lr(step: int, total: int, peak: float, floor: float, warmup: int, decay: int,
           shape: str = "exp") -> float:
    """Warmup-Stable-Decay: linear warmup over `warmup` steps, `peak` while stable, then the last `decay` steps go
    from peak to `floor`, reaching it at step total-1 (exp: geometric, MiniCPM's 0.5^(s/T_half); or linear)."""
    if not 0 <= step < total:
        raise ValueError(f"step {step} outside [0, {total})")
    if warmup + decay > total:
        raise ValueError(f"warmup {warmup} + decay {decay} steps exceed the {total} total steps")
    w = _warmup(step, warmup, peak)
    if w is not None:
        return w
    start = total - decay
    if step < start:
        return peak
    p = (step - start + 1) / decay  # (0, 1]
    if shape == "exp":
        return peak * (floor / peak) ** p
    if shape == "linear":
        return peak + (floor - peak) * p
    raise ValueError(f"unknown WSD decay shape {shape!r}; use 'exp' or 'linear'")


def cosine_lr(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """Linear warmup then half a cosine from peak to `floor`, reaching it at step total-1."""
    if not 0 <= step < total:
        raise ValueError(f"step {step} outside [0, {total})")
    w = _warmup(step, warmup, peak)
    if w is not None:
        return w
    p = (step - warmup + 1) / (total - warmup)  # (0, 1]
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * p))


def frac_steps(frac: float, total: int) -> int:
    return int(round(frac * total))


# ---- per-step helpers -----------------------------------------------------------------------------------------
def label_tokens(batch: dict) -> int:
    """Tokens that carry a loss: label[t] for t >= 1 that is not -100 (the model predicts label[t] at t-1)."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("training batch has no 'labels'")
    return int((labels[:, 1:] != -100).sum())


def has_visuals(batch: dict) -> bool:
    return any(len(v) for v in (batch.get("pixel_values") or []))


def add_dummy_visual(batch: dict, query_num: int, patch: int, pad_id: int = 0) -> dict:
    """A text-only batch never runs the vision tower / resampler. Under DDP their parameters then get no gradient
    (the reducer waits forever), and under FSDP2 ranks issue different all-gathers. We append `query_num` masked,
    unlabelled positions to every row and scatter a 2x2-patch black view into row 0's: same module
    order on every rank, zero contribution to the loss (masked keys, ignored labels), gradient exactly 0."""
    ids = batch["input_ids"]
    B, T = ids.shape
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, torch.full((B, query_num), pad_id, dtype=ids.dtype)], 1)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    out["attention_mask"] = torch.cat([mask, torch.zeros(B, query_num, dtype=mask.dtype)], 1)
    out["labels"] = torch.cat([batch["labels"], torch.full((B, query_num), -100, dtype=ids.dtype)], 1)
    if batch.get("segment_ids") is not None:  # packed rows: the dummy positions are padding (segment 0)
        seg = batch["segment_ids"]
        out["segment_ids"] = torch.cat([seg, torch.zeros(B, query_num, dtype=seg.dtype)], 1)
    if batch.get("position_ids") is not None:
        pos = batch["position_ids"]
        out["position_ids"] = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(query_num)], 1)
    out["pixel_values"] = [[torch.zeros(3, 2 * patch, 2 * patch)]] + [[] for _ in range(B - 1)]
    out["temporal_ids"] = [[[-1]]] + [[] for _ in range(B - 1)]
    out["image_bound"] = [torch.tensor([[T, T + query_num]])] + [torch.zeros(0, 2, dtype=torch.long)] * (B - 1)
    return out


MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "temporal_ids", "image_bound", "position_ids", "labels",
              "segment_ids")


def to_device(batch: dict, device: torch.device) -> dict:
    """The keys MiniCPMV.forward takes (drops bookkeeping such as `rows` or `id`), on `device`."""
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        if isinstance(x, list):
            return [move(v) for v in x]
        return x
    return {k: move(batch[k]) for k in MODEL_KEYS if batch.get(k) is not None}
