"""The training loop, one for every stage: pt1 / pt2 / pt3 (WSD), sft (cosine), video3d (warmup then cosine decay on
video data whose package sizes and frame rates the data source randomises).

Notable:
- Loss normalisation is per *token over the global batch*: each micro-batch's mean CE is re-weighted by
  `n_tokens * world / N_global` (N_global = label tokens over all micro-batches of all ranks), so DDP/FSDP's gradient
  *average* and accumulation give exactly the gradient of the mean CE over every labelled token of the step, the same
  as one process on the whole global batch (a plain `loss / accum` would over-weight short micro-batches).
- A micro-batch without images still runs the vision side on a masked dummy view when other ranks may have images or
  the vision side trains (common.add_dummy_visual): DDP then sees every parameter, FSDP2 ranks issue the same
  collectives, and AdamW's decay/momentum act on every trainable tensor every step, whatever the world size.
- bf16 only on CUDA (autocast for none/DDP; FSDP2's MixedPrecisionPolicy with fp32 gradient reduction); CPU stays
  fp32 (bf16 is slower there and resume identity is checked in fp32).
- `batches` is a function `position -> iterator of micro-batches` (position = micro-batches this rank already
  consumed); a list is accepted and cycled. That position is all the data state a resume needs.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from vlmcook.model.lora import DEFAULT_TARGETS, add_lora, has_lora
from vlmcook.train import common as C
from vlmcook.train import state as S
from vlmcook.train.flags import check_choices, opt

SCHEDULES = ("wsd", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Fields declared with `opt` are also `vlmcook train` flags (train/flags.py); lr, min_lr and
    schedule left None take the stage's defaults (common.STAGES)."""

    stage: str = opt("sft", "lm: LLM only (text); pt1: resampler; pt2: +vision tower; pt3/sft/video3d: everything",
                     required=True, choices=tuple(C.STAGES))
    steps: int = opt(1000, "optimizer steps")
    lr: float | None = opt(None, "peak learning rate")
    min_lr: float | None = opt(None, "learning rate reached at the last step")
    schedule: str | None = opt(None, "learning-rate schedule", choices=SCHEDULES)
    # Warmup and decay lengths are not public: 1% warmup as the released finetune script, 10% decay as MiniCPM found
    # sufficient (2.5% was too little).
    warmup_frac: float = opt(0.01, "fraction of the steps spent in linear warmup")
    decay_frac: float = opt(0.1, "WSD: fraction of the steps spent in the final decay")
    decay_shape: str = "exp"  # WSD only: exp (MiniCPM) | linear
    batch_size: int = opt(1, "samples per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    clip: float = opt(1.0, "max gradient norm; 0: no clipping")
    weight_decay: float = opt(0.1, "AdamW weight decay, except on norms, biases and resampler queries")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8  # AdamW epsilon
    grad_checkpointing: bool = opt(False, "recompute LLM layers in the backward pass (saves memory)")
    bf16: bool = True  # on CUDA only; CPU runs in fp32
    lora: bool = opt(False, "train LoRA adapters on the LLM instead of its weights")
    lora_r: int = opt(64, "LoRA rank, as the released finetune")
    lora_alpha: float = opt(64.0, "LoRA alpha")
    lora_dropout: float = 0.05
    lora_targets: str = opt(DEFAULT_TARGETS, "regex over module names to adapt", metavar="REGEX")
    lora_save_merged: bool = True  # also write step-N/merged/, the adapters folded into the weights
    dist: str = opt("none", "data parallelism over processes", choices=("none", "ddp", "fsdp"))
    out_dir: str | None = opt(None, "output folder: step-N/ checkpoints and `latest`", flag="out", required=True,
                              metavar="DIR")
    save_every: int = opt(0, "also checkpoint every N steps; 0: only at the end")
    resume: bool = opt(False, "continue from the output folder's `latest` checkpoint if there is one")
    seed: int = opt(0, "seed of the init, the data mixture and dropout")
    log_every: int = opt(10, "print a log line every N steps; 0: never")

    def __post_init__(self):
        for name in ("lr", "min_lr", "schedule"):
            if getattr(self, name) is None and self.stage in C.STAGES:
                object.__setattr__(self, name, getattr(C.STAGES[self.stage], name))  # frozen: set once, here
        check_choices(self)
        checks = [(self.steps >= 1 and self.grad_accum >= 1 and self.batch_size >= 1,
                   f"steps={self.steps}, grad_accum={self.grad_accum} and batch_size={self.batch_size} must be >= 1"),
                  (0 <= self.warmup_frac and 0 <= self.decay_frac and self.warmup_frac + self.decay_frac <= 1,
                   f"warmup_frac={self.warmup_frac} + decay_frac={self.decay_frac} must lie in [0, 1]"),
                  (0 <= self.min_lr <= self.lr, f"need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}"),
                  (not self.resume or self.out_dir, "resume needs out_dir")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    warmup = C.frac_steps(cfg.warmup_frac, cfg.steps)
    if cfg.schedule == "wsd":
        decay = C.frac_steps(cfg.decay_frac, cfg.steps)
        return C.wsd_lr(step, cfg.steps, cfg.lr, cfg.min_lr, warmup, decay, cfg.decay_shape)
    if cfg.schedule == "cosine":
        return C.cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, warmup)
    return cfg.lr


# ---- setup (kept out of the loop body) ------------------------------------------------------------------------
def wrap_model(model: nn.Module, cfg: TrainConfig, dist: C.Dist) -> nn.Module:
    if cfg.dist == "none" or not dist.enabled:
        if dist.enabled:
            raise ValueError(f"{dist.world_size} processes but TrainConfig.dist='none': use ddp or fsdp")
        return model
    if cfg.dist == "ddp":
        ids = [dist.device] if dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy()
    if cfg.bf16 and dist.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # One FSDP unit per transformer block (all-gathered just in time), the rest (embeddings, head, resampler,
    # norms) in the root unit.
    for layer in [*model.llm.model.layers, *model.vpm.encoder.layers]:
        fully_shard(layer, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def _batch_source(batches) -> Callable[[int], Iterator[dict]]:
    if callable(batches):
        return batches
    items = list(batches)
    if not items:
        raise ValueError("train: no batches")
    return lambda pos: (items[i % len(items)] for i in itertools.count(pos))


def _sync(model: nn.Module, cfg: TrainConfig, last: bool):
    """Reduce gradients across ranks only on the last micro-batch of a step."""
    if cfg.dist == "ddp" and isinstance(model, nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    if cfg.dist == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _autocast(cfg: TrainConfig, dist: C.Dist):
    if cfg.bf16 and dist.device.type == "cuda" and cfg.dist != "fsdp":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- the loop --------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, model: nn.Module, batches: Callable[[int], Iterator[dict]] | Sequence[dict],
          dist: C.Dist | None = None, tokenizer=None, on_step: Callable[[int, dict], None] | None = None,
          loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> list[float]:
    """Train `model` (a MiniCPMV, unwrapped) for cfg.steps optimizer steps; returns the loss of every step run.
    `loss_fn(net, batch) -> mean loss` replaces the LM loss (e.g. a component pre-training objective); its batches
    say how many targets they hold in `batch["num_targets"]` (the weight of a micro-batch in its step)."""
    dist = dist or C.setup_distributed()
    if cfg.out_dir:  # a folder that cannot hold the checkpoints fails now, not after the training
        S.check_out_dir(cfg.out_dir)
    C.seed_everything(cfg.seed)
    model_config = model.config
    if cfg.lora and not has_lora(model):
        add_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    n_train, n_frozen = C.set_trainable(model, cfg.stage)
    C.seed_everything(cfg.seed + dist.rank)  # same LoRA init on every rank above; different dropout masks below
    C.print0(f"stage {cfg.stage}: {n_train:,} trainable / {n_frozen:,} frozen parameters")
    start, position, state = 0, 0, None
    folder = S.latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if cfg.resume and folder is None:
        C.print0(f"resume: no checkpoint in {cfg.out_dir} yet, starting from step 0")
    if folder is not None:
        state = S.read_checkpoint(folder, cfg, model_config, dist)
        S.load_model_state(folder, model)
        start, position = state["step"], state["data_position"]
        C.print0(f"resuming from {folder} at step {start}")
    model.llm.model.gradient_checkpointing = cfg.grad_checkpointing
    if not (cfg.dist == "fsdp" and dist.enabled):  # fully_shard moves only each rank's shard to the device
        model.to(dist.device)
    model.train()
    vision_trains = any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("llm."))
    net = wrap_model(model, cfg, dist)
    opt = C.make_optimizer(net, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    if state is not None:
        S.load_trainer_state(state, net, opt, dist)
    params = [p for p in net.parameters() if p.requires_grad]
    data = _batch_source(batches)(position)
    history: list[float] = []
    bar = tqdm(total=cfg.steps, initial=start, desc=cfg.stage, disable=not dist.is_main, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = [next(data) for _ in range(cfg.grad_accum)]
        position += cfg.grad_accum
        counts = [b["num_targets"] if loss_fn else C.label_tokens(b) for b in micro]
        # Label tokens of the whole global step: every micro-batch's loss is weighted by its share of them.
        total = C.all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64, device=dist.device), dist).item()
        loss_sum = torch.zeros((), device=dist.device)
        tokens = 0
        for i, b in enumerate(micro):
            if not loss_fn and not C.has_visuals(b) and (dist.enabled or vision_trains):
                b = C.add_dummy_visual(b, model_config.query_num, model_config.patch_size)
            if loss_fn:  # the hook's batch is its own business (device included)
                tokens += counts[i]
            else:
                b = C.to_device(b, dist.device)
                mask = b.get("attention_mask")
                tokens += int(mask.sum()) if mask is not None else b["input_ids"].numel()
            with _sync(net, cfg, last=i == len(micro) - 1), _autocast(cfg, dist):
                loss = loss_fn(net, b) if loss_fn else net(**b).loss
                weight = counts[i] * dist.world_size / max(total, 1.0)
                (loss * weight).backward()
            loss_sum += loss.detach().float() * counts[i]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = C.all_reduce_sum(loss_sum, dist).item() / max(total, 1.0)
        history.append(loss)
        tokens_s = C.all_reduce_sum(torch.tensor(float(tokens), device=dist.device), dist).item()
        tokens_s /= time.perf_counter() - t0
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        metrics = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens_s}
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_s:,.0f}")
        if dist.is_main and cfg.log_every and (step + 1) % cfg.log_every == 0:
            bar.write(f"step {step + 1}/{cfg.steps} loss {loss:.4f} lr {lr:.3e} grad_norm {float(grad_norm):.3f} "
                      f"tokens/s {tokens_s:,.0f}")
        done = step + 1
        if cfg.out_dir and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
            S.save_checkpoint(cfg.out_dir, done, net, opt, cfg, position, dist, model_config, tokenizer)
        if on_step is not None:
            on_step(step, metrics)
    bar.close()
    return history
