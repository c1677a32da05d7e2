"""The hybrid short/long GRPO loop, in plain sight: rollouts -> rewards -> advantages -> mini-batch updates.

Per step (docs/reference.md R4.1, R7): `prompts_per_step` prompts (global), each in a mode drawn with
`long_share`, G samples each at temperature 1.0 (rollout.py); composite rewards (rewards.py); group advantages;
zero-variance groups (and, optionally, RLPR's std filter) dropped; then `epochs` x `mini_batches` optimizer steps
of the clipped token-mean surrogate (grpo.py) against the log-probs the rollout policy gave.

Notable:
- The prompt order and every sampling seed are pure functions of (seed, step): resume redraws the same rollouts.
  Checkpoints are train/state.py's (released layout + optimizer + RNG); the RL extras (RLPR baselines, std-filter
  EMA, RL tokens so far) go to `out/rl_state-step-N.json`, written *before* the step folder so `latest` never
  names a step without them.
- RL tokens = every completion token sampled (dropped groups included): what the paper's "RL training tokens"
  compare between hybrid and long-only runs.
- torchrun: each rank rolls out its share; each mini-batch's loss is divided by its *global* token count, so
  DDP's gradient average equals the single-process token-mean (every rank runs the same number of mini-batches; one
  with no loss token anywhere is skipped: AdamW's momentum would move the weights on a zero gradient).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from vlmcook.data.processor import Processor
from vlmcook.infer.engine import Engine
from vlmcook.model.lora import DEFAULT_TARGETS, add_lora, has_lora
from vlmcook.rl import grpo
from vlmcook.rl.rewards import RLPR, RewardConfig, composite_rewards, concise_preference
from vlmcook.rl.rollout import ContinuationScorer, Task, draw_modes, make_groups, rollout
from vlmcook.train import common as C
from vlmcook.train import state as S
from vlmcook.train.flags import check_choices, opt


# The response limit of RL rollouts (the paper: 8192); inference has its own defaults (engine, API, server).
ROLLOUT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class RLConfig:
    """One RL run. Fields declared with `opt` are also `vlmcook rl` flags (train/flags.py)."""

    steps: int = opt(100, "RL steps")
    prompts_per_step: int = opt(16, "prompts per step over all processes; the paper: 128")
    group_size: int = opt(8, "samples per prompt, G")
    long_share: float = opt(0.5, "share of prompts rolled out in long (thinking) mode; 1.0 = long-only")
    max_new_tokens: int = opt(ROLLOUT_MAX_NEW_TOKENS, "response length limit of a rollout sample, in tokens")
    temperature: float = opt(1.0, "rollout sampling temperature")
    top_p: float = 1.0
    lr: float = opt(1e-6, "learning rate, constant as in the paper")
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0  # max grad norm; 0 = off
    mini_batches: int = opt(4, "optimizer steps per rollout batch and epoch")
    epochs: int = opt(1, "passes over each rollout batch")
    eps_low: float = opt(0.2, "lower clip of the probability ratio")
    eps_high: float = opt(0.28, "upper clip of the probability ratio")
    scale_rewards: str = "group"  # group | none
    kl_coef: float = opt(0.0, "weight of the k3 KL to the starting policy; 0: off")
    entropy_coef: float = opt(0.0, "weight of the entropy bonus; 0: off")
    truncation: str = opt("keep", "completions cut at the length limit: keep them in the loss, or mask them out",
                          choices=grpo.TRUNCATION_POLICIES)
    std_filter: bool = opt(False, "drop prompts by RLPR's EMA reward-std filter (beta 0.5, decay 0.99)")
    rm_weight: float = opt(0.5, "weight of the group z-scored preference score in the reward")
    rep_ngram: int = 10
    rep_limit: int = 10
    rows_per_call: int = 64  # engine batch rows
    stage: str = opt("sft", "which parameters train, as in `vlmcook train`; sft: all", choices=tuple(C.STAGES))
    lora: bool = opt(False, "train LoRA adapters on the LLM instead of its weights")
    lora_r: int = 64
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0  # dropout would make pi_old (no-grad pass) and pi (training pass) disagree
    lora_targets: str = DEFAULT_TARGETS
    lora_save_merged: bool = True
    dist: str = opt("none", "data parallelism over processes", choices=("none", "ddp"))
    out_dir: str | None = opt(None, "output folder: step-N/ checkpoints, `latest` and rl_log.jsonl", flag="out",
                              required=True, metavar="DIR")
    save_every: int = opt(0, "also checkpoint every N steps; 0: only at the end")
    resume: bool = opt(False, "continue from the output folder's `latest` checkpoint if there is one")
    seed: int = opt(0, "seed of the init, the prompt order and the rollouts")
    log_every: int = opt(1, "print a log line every N steps; 0: never")

    def __post_init__(self):
        check_choices(self)
        checks = [(self.steps >= 1 and self.prompts_per_step >= 1,
                   f"steps={self.steps} and prompts_per_step={self.prompts_per_step} must be >= 1"),
                  (self.group_size >= 2, f"group_size={self.group_size} must be >= 2 (advantages compare samples "
                   f"of a prompt)"),
                  (0 <= self.long_share <= 1, f"long_share={self.long_share} must lie in [0, 1]"),
                  (self.mini_batches >= 1 and self.epochs >= 1,
                   f"mini_batches={self.mini_batches} and epochs={self.epochs} must be >= 1"),
                  (0 <= self.eps_low < 1 and self.eps_high >= 0,
                   f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low} and {self.eps_high}"),
                  (self.scale_rewards in ("group", "none"), f"scale_rewards={self.scale_rewards!r} must be group "
                   f"or none"),
                  (not self.resume or self.out_dir, "resume needs out_dir")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"RLConfig: {msg}")


@dataclass
class RLState:
    """What a resume needs besides weights/optimizer/RNG."""

    rl_tokens: int = 0
    ema_std: float | None = None
    baselines: dict = field(default_factory=dict)


def step_tasks(tasks: list[Task], cfg: RLConfig, step: int, dist: C.Dist) -> tuple[list[Task], list[str]]:
    """This rank's prompts of `step` (a seeded shuffle per pass over the data) and their mode keys."""
    n = len(tasks)
    out, keys = [], []
    for k in range(dist.rank, cfg.prompts_per_step, dist.world_size):
        g = step * cfg.prompts_per_step + k
        order = list(range(n))
        random.Random(f"rl-order:{cfg.seed}:{g // n}").shuffle(order)
        out.append(tasks[order[g % n]])
        keys.append(f"{step}:{k}")
    return out, keys


def _flatten(groups, adv: torch.Tensor, keep: torch.Tensor, cfg: RLConfig) -> list[tuple]:
    """(prompt, completion ids, advantage, loss weight) of every sample of the kept groups."""
    rows = []
    for i, g in enumerate(groups):
        if not keep[i]:
            continue
        trunc = torch.tensor([c.truncated for c in g.completions])
        w = grpo.truncation_weights(trunc, cfg.truncation)
        for j, c in enumerate(g.completions):
            if c.token_ids:
                rows.append((g.prompt, c.token_ids, float(adv[i, j]), float(w[j])))
    return rows


def _chunks(rows: list, n: int) -> list[list]:
    return [rows[k::n] for k in range(n)]


def update(net: nn.Module, opt, rows: list[tuple], cfg: RLConfig, dist: C.Dist, pad_id: int, step: int,
           fallback: tuple | None, ref: nn.Module | None = None) -> dict:
    """epochs x mini_batches clipped-surrogate steps on rows = [(prompt, ids, adv, weight)]."""
    params = [p for p in net.parameters() if p.requires_grad]
    old = _logprobs(net, rows, pad_id)  # the rollout policy (pi_old), before any update
    refl = _logprobs(ref, rows, pad_id) if ref is not None else None
    stats: Counter = Counter({"loss": 0.0, "grad_norm": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0})
    n_updates = 0
    for epoch in range(cfg.epochs):
        order = list(range(len(rows)))
        random.Random(f"rl-mb:{cfg.seed}:{step}:{epoch}").shuffle(order)
        for mb in _chunks(order, cfg.mini_batches):
            # Tokens with a loss in this mini-batch over all ranks. None (every group dropped, or only masked
            # truncations): skip the step on every rank alike - an AdamW step on zero gradients would still move
            # the weights through its momentum.
            n_local = sum(len(rows[k][1]) for k in mb if rows[k][3] > 0)
            n_global = C.all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float64, device=dist.device),
                                        dist).item()
            if n_global == 0:
                continue
            sel = [rows[k] for k in mb] or [(*fallback[:2], 0.0, 0.0)]  # every rank joins every DDP step
            logp, mask = net(*_mb_inputs(sel), pad_id)
            L = logp.shape[1]
            old_lp = _pad([old[k] for k in mb], L) if mb else logp.detach()
            ref_lp = _pad([refl[k] for k in mb], L) if (mb and refl is not None) else None
            adv = torch.tensor([r[2] for r in sel], device=logp.device)
            weight = torch.tensor([r[3] for r in sel], device=logp.device)
            m = mask & (weight[:, None] > 0)
            loss, st = grpo.grpo_loss(logp, old_lp, adv, m, cfg.eps_low, cfg.eps_high,
                                      n_tokens=n_global / dist.world_size, ref_logp=ref_lp,
                                      kl_coef=cfg.kl_coef if ref_lp is not None else 0.0)
            if cfg.entropy_coef:  # entropy needs full logits; only here, so the default path stays lean
                loss = loss - cfg.entropy_coef * _entropy(net, sel, pad_id)
            loss.backward()
            for p in params:  # parts the batch did not reach (e.g. vision on text-only prompts): a zero gradient,
                if p.grad is None:  # so every trainable tensor has optimizer state and a resume loads strictly
                    p.grad = torch.zeros_like(p)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats.update({"loss": float(loss.detach()), "grad_norm": float(gn), **st})
            n_updates += 1
    return {**{k: v / max(n_updates, 1) for k, v in stats.items()}, "updates": n_updates}


@torch.no_grad()
def _logprobs(net: nn.Module, rows: list[tuple], pad_id: int, chunk: int = 32) -> list[torch.Tensor]:
    """Per row, the log-probs [len(ids)] of its completion under `net` (no grad), batched `chunk` rows at a time."""
    out = []
    for k in range(0, len(rows), chunk):
        sel = rows[k:k + chunk]
        logp, _ = net(*_mb_inputs(sel), pad_id)
        out += [logp[b, :len(r[1])] for b, r in enumerate(sel)]
    return out


def _mb_inputs(rows: list[tuple]) -> tuple[list[dict], list[list[int]]]:
    return [r[0] for r in rows], [r[1] for r in rows]


def _pad(xs: list[torch.Tensor], L: int) -> torch.Tensor:
    out = torch.zeros(len(xs), L, device=xs[0].device)
    for b, x in enumerate(xs):
        out[b, :len(x)] = x[:L]
    return out


def _entropy(net, rows, pad_id) -> torch.Tensor:
    """Token-mean entropy of the policy over the rows' completion positions (full-vocabulary logits)."""
    model = net.module.model if hasattr(net, "module") else net.model
    prompts, conts = _mb_inputs(rows)
    hs = []
    for p, c in zip(prompts, conts):
        ids = torch.cat([p["input_ids"], torch.tensor([c])], 1)
        out = model(ids, pixel_values=p["pixel_values"] if len(p["temporal_ids"][0]) else None,
                    temporal_ids=p["temporal_ids"], image_bound=p["image_bound"]).logits
        start = p["input_ids"].shape[1]
        hs.append(grpo.entropy(out[:, start - 1:start - 1 + len(c)], torch.ones(1, len(c))))
    return torch.stack(hs).mean()


def step_metrics(groups, rewards: dict, keep: torch.Tensor, issues: Counter) -> dict:
    """Reward components, accuracy (R_acc >= 0.5) and mean length per mode, fraction of groups dropped."""
    m = {f"reward_{k}": float(v.mean()) for k, v in rewards.items() if k != "rm"}
    for name, long in (("long", True), ("short", False)):
        idx = [i for i, g in enumerate(groups) if g.long == long]
        lens = [len(c.token_ids) for i in idx for c in groups[i].completions]
        m[f"n_{name}"] = len(idx)
        m[f"acc_{name}"] = float((rewards["acc"][idx] >= 0.5).float().mean()) if idx else float("nan")
        m[f"len_{name}"] = sum(lens) / len(lens) if lens else float("nan")
    m["frac_dropped"] = 1.0 - float(keep.float().mean()) if len(keep) else 0.0
    m["tokens"] = sum(len(c.token_ids) for g in groups for c in g.completions)
    m.update({f"issue_{k}": v for k, v in issues.items()})
    return m


def _save_rl_state(out: Path, step: int, st: RLState) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rl_state-step-{step}.json.tmp"
    tmp.write_text(json.dumps(asdict(st)))
    os.replace(tmp, out / f"rl_state-step-{step}.json")


def _load_rl_state(out: Path, step: int) -> RLState:
    path = out / f"rl_state-step-{step}.json"
    if not path.is_file():
        raise S.ResumeError(f"{path} is missing: the RL extras of step {step} (RLPR baselines, EMA, token count)")
    return RLState(**json.loads(path.read_text()))


def train_rl(cfg: RLConfig, model: nn.Module, tokenizer, tasks: list[Task], dist: C.Dist | None = None,
             rm=concise_preference, on_step=None) -> list[dict]:
    """GRPO on `tasks` for cfg.steps steps; returns the per-step metrics (rank 0's view of global sums)."""
    if not tasks:
        raise ValueError("train_rl: no tasks")
    dist = dist or C.setup_distributed()
    if dist.enabled and cfg.dist != "ddp":
        raise ValueError(f"{dist.world_size} processes but RLConfig.dist='none': use --dist ddp")
    if cfg.prompts_per_step < dist.world_size:
        raise ValueError(f"RLConfig.prompts_per_step={cfg.prompts_per_step} < {dist.world_size} processes: every "
                         f"rank needs at least one prompt per step")
    if dist.enabled and cfg.entropy_coef:
        raise ValueError("RLConfig.entropy_coef: the entropy bonus runs outside DDP's forward (full-vocabulary "
                         "logits), so it is single-process only; set it to 0 under torchrun")
    C.seed_everything(cfg.seed)
    if cfg.lora and not has_lora(model):
        add_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    C.set_trainable(model, cfg.stage)
    if cfg.out_dir:  # a folder that cannot hold the log and checkpoints fails now, not after a step
        S.check_out_dir(cfg.out_dir)
    ref = None
    if cfg.kl_coef:  # a frozen copy of the policy this process starts from (after a resume: the resumed weights)
        import copy
        ref = ContinuationScorer(copy.deepcopy(model).requires_grad_(False).to(dist.device))
    start, st, state = 0, RLState(), None
    folder = S.latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if folder is not None:
        state = S.read_checkpoint(folder, cfg, model.config, dist)
        S.load_model_state(folder, model)
        start = state["step"]
        st = _load_rl_state(Path(cfg.out_dir), start)
        C.print0(f"resuming RL from {folder} at step {start}")
    model.to(dist.device)
    scorer = ContinuationScorer(model)
    net = nn.parallel.DistributedDataParallel(scorer, find_unused_parameters=True) if dist.enabled else scorer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=cfg.betas, foreach=False)
    if state is not None:
        S.load_trainer_state(state, model, opt, dist)
    processor, engine = Processor(tokenizer, model.config), Engine(model, tokenizer)
    rlpr = RLPR(scorer, tokenizer, processor)
    rlpr.baselines.update(st.baselines)
    if any(t.verifier == "prob" for t in tasks):
        model.eval()
        rlpr.precompute(tasks)  # scoreA with the initial policy, once (RLPR)
    reward_cfg = RewardConfig(cfg.rm_weight, cfg.rep_ngram, cfg.rep_limit)
    history = []
    bar = tqdm(total=cfg.steps, initial=start, desc="rl", disable=not dist.is_main, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        mine, keys = step_tasks(tasks, cfg, step, dist)
        model.eval()
        groups = make_groups(mine, draw_modes(keys, cfg.long_share, cfg.seed), processor, keys)
        rollout(engine, groups, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, step,
                cfg.rows_per_call)
        t_roll = time.perf_counter() - t0
        rewards, issues = composite_rewards(groups, reward_cfg, rm, rlpr)
        total = rewards["total"]
        keep = ~grpo.zero_variance_groups(total)
        if cfg.std_filter:
            std_keep, st.ema_std = grpo.std_filter(total.std(1), st.ema_std, step)
            keep &= std_keep
        adv = grpo.group_advantages(total, cfg.scale_rewards)
        rows = _flatten(groups, adv, keep, cfg)
        model.train()
        fallback = (groups[0].prompt, groups[0].completions[0].token_ids or [tokenizer.im_end_id])
        upd = update(net, opt, rows, cfg, dist, tokenizer.pad_id, step, fallback, ref)
        metrics = _global_metrics(step_metrics(groups, rewards, keep, issues), dist)
        st.rl_tokens += int(metrics["tokens"])
        metrics.update(upd, step=step + 1, rl_tokens=st.rl_tokens, rollout_s=t_roll,
                       step_s=time.perf_counter() - t0)
        history.append(metrics)
        _log(metrics, cfg, dist, bar)
        done = step + 1
        if cfg.out_dir and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
            st.baselines = dict(rlpr.baselines)
            if dist.is_main:
                _save_rl_state(Path(cfg.out_dir), done, st)
            S.save_checkpoint(cfg.out_dir, done, model, opt, cfg, done, dist, model.config, tokenizer)
        if on_step is not None:
            on_step(step, metrics)
    bar.close()
    return history


def _global_metrics(m: dict, dist: C.Dist) -> dict:
    """Counts summed over ranks; per-mode accuracy / length weighted by each rank's prompts of that mode; other
    means averaged over ranks (each rank holds the same number of prompts, up to one). No-op on one process."""
    if not dist.enabled:
        return m
    m = dict(m)
    for mode in ("long", "short"):  # a rank without prompts of a mode has NaN there: weight 0
        for k in (f"acc_{mode}", f"len_{mode}"):
            m[k] = m[k] * m[f"n_{mode}"] if m[f"n_{mode}"] else 0.0
    names = [None] * dist.world_size
    torch.distributed.all_gather_object(names, sorted(m))  # issue_* keys differ between ranks: use the union
    keys = sorted(set().union(*names))
    vals = torch.tensor([float(m.get(k, 0.0)) for k in keys], dtype=torch.float64, device=dist.device)
    out = dict(zip(keys, C.all_reduce_sum(vals, dist).tolist()))
    for k in keys:
        if not (k in ("tokens", "n_long", "n_short") or k.startswith(("issue_", "acc_", "len_"))):
            out[k] /= dist.world_size
    for mode in ("long", "short"):
        n = out[f"n_{mode}"]
        for k in (f"acc_{mode}", f"len_{mode}"):
            out[k] = out[k] / n if n else float("nan")
    return out


def _log(m: dict, cfg: RLConfig, dist: C.Dist, bar) -> None:
    bar.update(1)
    bar.set_postfix(R=f"{m['reward_total']:.3f}", acc_l=f"{m['acc_long']:.2f}", acc_s=f"{m['acc_short']:.2f}")
    if not dist.is_main:
        return
    if cfg.log_every and m["step"] % cfg.log_every == 0:
        bar.write(f"step {m['step']}/{cfg.steps} R {m['reward_total']:.3f} (acc {m['reward_acc']:.3f} fmt "
                  f"{m['reward_format']:.3f} rep {m['reward_rep']:.3f} rm_z {m['reward_rm_z']:.3f}) | acc long "
                  f"{m['acc_long']:.2f} short {m['acc_short']:.2f} | len long {m['len_long']:.1f} short "
                  f"{m['len_short']:.1f} | dropped {m['frac_dropped']:.2f} | RL tokens {m['rl_tokens']:,}")
    if cfg.out_dir:  # created by check_out_dir before the first step
        with open(Path(cfg.out_dir) / "rl_log.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")


@torch.no_grad()
def evaluate_policy(model: nn.Module, tokenizer, tasks: list[Task], long: bool, max_new_tokens: int,
                    temperature: float = 0.0, seed: int = 0) -> dict:
    """Accuracy (rule verifiers, R_acc >= 0.5), mean response length (tokens) and format-valid share in one mode."""
    model.eval()
    processor, engine = Processor(tokenizer, model.config), Engine(model, tokenizer)
    groups = make_groups(tasks, [long] * len(tasks), processor)
    rollout(engine, groups, 1, max_new_tokens, temperature, 1.0, seed, 0)
    rewards, issues = composite_rewards(groups, RewardConfig(rm_weight=0.0), rm=None)
    lens = [len(g.completions[0].token_ids) for g in groups]
    return {"acc": float((rewards["acc"] >= 0.5).float().mean()), "len": sum(lens) / len(lens),
            "format_ok": float((rewards["format"] == 0).float().mean()), "issues": dict(issues)}
