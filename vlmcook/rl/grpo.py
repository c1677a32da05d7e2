"""GRPO as small pure functions: advantages, the clipped token-level surrogate, optional KL / entropy terms, group
dropping and the truncation rule. Everything takes tensors and returns tensors; the loop is in rl/train.py.

Notable (docs/reference.md R4.1, R5, R7):
- Advantage (verl / RLPR / TRL "group"): A_i = (r_i - mean_g r) / (std_g r + eps), unbiased std, eps = 1e-6;
  `scale="none"` is Dr. GRPO's r_i - mean. One advantage per completion, broadcast over its tokens.
- Groups whose rewards have std < 1e-6 carry no signal (every A_i = 0): they are dropped *before* the update, so
  they neither cost compute nor dilute the token-mean (DAPO's dynamic sampling, without refilling).
- Loss: token-mean of -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) with rho = exp(logp - logp_old), over
  every completion token of the mini-batch (DAPO / verl "token-mean"); asymmetric clip 0.2 / 0.28 (clip-higher).
- No KL and no entropy term by default (MiniCPM-V 4.5 removed both); each is one coefficient away.
- Truncated completions (hit max_new_tokens) are handled explicitly: "keep" (default, TRL's default) trains on them
  with the reward they got; "mask" (TRL's mask_truncated_completions) gives them zero loss weight while they
  still count in their group's mean/std.
"""

from __future__ import annotations

import torch

TRUNCATION_POLICIES = ("keep", "mask")


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards [N, G] (N prompts x G samples) -> advantages [N, G].

    scale="group": A = (r - mean_g) / (std_g + eps), std unbiased (G - 1 in the denominator), as verl and RLPR;
    scale="none":  A = r - mean_g (Dr. GRPO). A group of identical rewards gets A = 0 either way."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: rewards must be [N prompts, G >= 2 samples], got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("group_advantages: rewards contain NaN/inf (rewards.py maps those to defined values)")
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "group":
        return centred / (rewards.std(1, unbiased=True, keepdim=True) + eps)
    raise ValueError(f"group_advantages: unknown scale {scale!r}; use 'group' or 'none'")


def zero_variance_groups(rewards: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """rewards [N, G] -> bool [N]: True where std_g(r) < tol (all samples scored alike: no learning signal)."""
    return rewards.std(1, unbiased=True) < tol


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target_t | <t): logits [..., V] (the position *before* each target), targets [...] -> [...], fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.28, n_tokens: float | None = None
                      ) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO clipped surrogate, token level. logp, old_logp, mask [B, T]; adv [B] (or [B, T]).

        rho_t = exp(logp_t - old_logp_t)
        L = sum_t mask_t * -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) / n_tokens

    n_tokens defaults to mask.sum() (token-mean over this mini-batch); pass the token count of the whole rollout
    batch to make the sum over mini-batches the global token-mean. Returns (loss, stats: clip fraction, ratio)."""
    if adv.ndim == 1:
        adv = adv[:, None]
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    denom = float(mask.sum()) if n_tokens is None else float(n_tokens)
    loss = (per_token * mask).sum() / max(denom, 1.0)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        # clip active = the min picked the clipped term (that token's gradient is 0)
        stats = {"clip_frac": float(((clipped < unclipped).to(mask.dtype) * mask).sum() / n),
                 "ratio_mean": float((ratio * mask).sum() / n)}
    return loss, stats


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean of the k3 estimator of KL(pi || pi_ref) (Schulman; verl "low_var_kl"), >= 0 for every token:

        k3_t = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1"""
    d = ref_logp - logp
    k3 = torch.exp(d) - d - 1
    mask = mask.to(k3.dtype)
    return (k3 * mask).sum() / mask.sum().clamp(min=1)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean of H_t = -sum_v p_v log p_v over masked positions; logits [B, T, V], mask [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    mask = mask.to(h.dtype)
    return (h * mask).sum() / mask.sum().clamp(min=1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              eps_low: float = 0.2, eps_high: float = 0.28, n_tokens: float | None = None,
              ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, logits: torch.Tensor | None = None,
              entropy_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """L = clipped_surrogate + kl_coef * KL_k3 - entropy_coef * H (the last two only when their coef != 0)."""
    loss, stats = clipped_surrogate(logp, old_logp, adv, mask, eps_low, eps_high, n_tokens)
    if kl_coef:
        if ref_logp is None:
            raise ValueError("grpo_loss: kl_coef > 0 needs ref_logp (log-probs of a frozen reference policy)")
        kl = kl_penalty(logp, ref_logp, mask)
        loss = loss + kl_coef * kl
        stats["kl"] = float(kl)
    if entropy_coef:
        if logits is None:
            raise ValueError("grpo_loss: entropy_coef > 0 needs the logits")
        h = entropy(logits, mask)
        loss = loss - entropy_coef * h
        stats["entropy"] = float(h)
    return loss, stats


def truncation_weights(truncated: torch.Tensor, policy: str = "keep") -> torch.Tensor:
    """truncated bool [B] -> loss weight [B]: "keep" = 1 for all; "mask" = 0 for truncated completions."""
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation policy {policy!r}; use one of {TRUNCATION_POLICIES}")
    if policy == "keep":
        return torch.ones(truncated.shape, dtype=torch.float32)
    return (~truncated.bool()).float()


def std_filter(stds: torch.Tensor, ema: float | None, step: int, beta: float = 0.5, decay: float = 0.99,
               ema_start: int = 6, filter_start: int = 11) -> tuple[torch.Tensor, float | None]:
    """RLPR's curriculum filter. stds [N] (reward std per prompt) -> (keep bool [N], new ema).

        ema <- mean(stds) at step ema_start, then decay * ema + (1 - decay) * mean(stds)
        keep = stds >= beta * ema   (from step filter_start on; before that keep all)"""
    mean = float(stds.mean()) if stds.numel() else 0.0
    if step >= ema_start:
        ema = mean if ema is None else decay * ema + (1 - decay) * mean
    keep = torch.ones(stds.shape, dtype=torch.bool)
    if step >= filter_start and ema is not None:
        keep = stds >= beta * ema
    return keep, ema
