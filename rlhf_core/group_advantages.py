"""Critic-free policy optimisation (GRPO, RLOO) as pure tensor functions.

Both sample K responses to each prompt and use the other responses to the same prompt as the baseline a critic
would otherwise learn. Scores are `[B, K]`: row b holds the K responses to prompt b. One advantage per response
applies to every one of its tokens (there is no per-token credit assignment without a critic).

    RLOO  (Ahmadian et al. 2024, "Back to basics")      A_i = s_i − mean_{j≠i} s_j
    GRPO  (Shao et al. 2024, DeepSeekMath)              A_i = (s_i − mean_j s_j) / (std_j s_j + eps)
    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero") A_i = s_i − mean_j s_j   (`scale_by_std=False`)

The policy loss is PPO's clipped surrogate on these advantages, optionally minus a k3 KL penalty to the reference
per token, aggregated over tokens in one of three ways (`aggregate`). Conventions as in `losses.py`: tensors over
response tokens are `[B, T]`, `mask` 1 on real response tokens; losses are minimised; diagnostics are detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rlhf_core.losses import masked_mean, masked_sum

LossAggregation = Literal["token", "sequence", "constant"]


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages `[B, K]` from scores `[B, K]` (K ≥ 2):

        A_i = s_i − 1/(K−1) · Σ_{j≠i} s_j  =  K/(K−1) · (s_i − mean_j s_j)

    The baseline of response i excludes i itself, so it is independent of s_i and the gradient estimate stays
    unbiased. Each row sums to 0. Detached.
    """
    scores = scores.detach()
    k = scores.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    others_mean = (scores.sum(dim=-1, keepdim=True) - scores) / (k - 1)
    return scores - others_mean


def grpo_advantages(scores: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages `[B, K]` from scores `[B, K]` (K ≥ 2):

        A_i = (s_i − μ) / (σ + eps)      (scale_by_std=True, GRPO)
        A_i =  s_i − μ                   (scale_by_std=False, Dr. GRPO)

    μ = mean_j s_j and σ = sqrt(Σ_j (s_j − μ)² / (K − 1)), the sample standard deviation of the group (as in
    TRL's GRPOTrainer). Dividing by σ weighs prompts whose answers all score alike (tiny σ) as much as prompts
    with a real spread, which Dr. GRPO calls a difficulty bias; a group of identical scores gets A = 0 either way.
    `eps` only keeps that case finite. Detached.
    """
    scores = scores.detach()
    if scores.shape[-1] < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got {scores.shape[-1]}")
    centred = scores - scores.mean(dim=-1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (scores.std(dim=-1, keepdim=True) + eps)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π‖π_ref) on sampled tokens, with gradient through `logprobs`:

        KL_t = r_t − log r_t − 1,   r_t = π_ref(a_t) / π(a_t) = exp(ref_logprobs − logprobs)

    ≥ 0 on every token and 0 exactly where π = π_ref (Schulman 2020; the GRPO paper's penalty). Its gradient with
    respect to log π is 1 − r_t: it pulls a token's log-prob down where π exceeds π_ref and up where it falls
    short. `[B, T]` each; 0 outside the mask.
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the log-ratio on padding first, so a -inf/nan log-prob there cannot reach exp() or the gradient.
    log_ratio = torch.where(mask.bool(), ref_logprobs.detach() - logprobs, zero)  # log r
    return torch.expm1(log_ratio) - log_ratio


def aggregate(x: torch.Tensor, mask: torch.Tensor, level: LossAggregation, max_len: int | None = None) -> torch.Tensor:
    """A per-token quantity `[B, T]` → one number, in one of three ways (`n_i` = valid tokens of row i):

        "token"     Σ_i Σ_t x_it / Σ_i n_i              (every token weighs the same; DAPO, TRL's default)
        "sequence"  1/B · Σ_i (Σ_t x_it / n_i)          (every response weighs the same; the GRPO paper)
        "constant"  1/B · Σ_i Σ_t x_it / max_len         (Dr. GRPO: a fixed normaliser, no length bias)

    With "sequence", the tokens of a short response weigh more than those of a long one, so a negative advantage
    is diluted in long responses: the length bias Dr. GRPO removes with "constant".
    """
    if level == "token":
        return masked_mean(x, mask)
    if level == "sequence":
        return masked_mean(x, mask, dim=1).mean()
    if level == "constant":
        if max_len is None or max_len < 1:
            raise ValueError(f"'constant' aggregation needs max_len >= 1, got {max_len}")
        return masked_sum(x, mask) / (x.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation {level!r}; expected 'token', 'sequence' or 'constant'")


def aggregation_units(mask: torch.Tensor, level: LossAggregation) -> float:
    """What `aggregate` averages over: valid tokens for "token", rows otherwise. A loss over a minibatch split
    into micro-batches is exact when each micro-batch's `aggregate` is weighted by its units ÷ the minibatch's."""
    return float(mask.sum()) if level == "token" else float(mask.shape[0])


@dataclass(frozen=True)
class GroupLossStats:
    """Detached diagnostics of `group_policy_loss`, 0-dim tensors (token means over valid tokens).

    clip_frac: share of tokens where the clipped term is strictly the active one (zero gradient), as in PPO.
    approx_kl: k3 estimate of KL(π_old‖π_new), ≥ 0.
    ref_kl: k3 estimate of KL(π‖π_ref) per token (0 when no reference log-probs are given).
    """

    clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    ref_kl: torch.Tensor


def group_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    level: LossAggregation = "token",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    max_len: int | None = None,
) -> tuple[torch.Tensor, GroupLossStats]:
    """The GRPO/RLOO loss to minimise, one advantage per response:

        ρ_t  = exp(log π(a_t) − log π_old(a_t))
        o_t  = min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε)·A) − β·KL_t          (KL_t = `k3_kl`, only with `ref_logprobs`)
        loss = −aggregate(o, mask, level)

    Shapes: `logprobs`, `old_logprobs`, `ref_logprobs`, `mask` `[B, T]`; `advantages` `[B]` (broadcast over the
    response's tokens). `old_logprobs`, `ref_logprobs` and `advantages` are constants. With one update per
    rollout ρ = 1 and the loss is REINFORCE with the group baseline (its gradient −A·∇log π per token).
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    advantage = advantages.detach().to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantage
    objective = torch.minimum(unclipped, clipped)
    kl = k3_kl(logprobs, ref_logprobs, mask) if ref_logprobs is not None else torch.zeros_like(logprobs)
    if ref_logprobs is not None and kl_coef:
        objective = objective - kl_coef * kl
    loss = -aggregate(objective, mask, level, max_len)
    with torch.no_grad():
        stats = GroupLossStats(
            clip_frac=masked_mean((clipped < unclipped).to(ratio.dtype), mask),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            ref_kl=masked_mean(kl, mask),
        )
    return loss, stats


def kl_penalized_scores(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """KL in the reward instead of the loss (RLOO's form): `s − β·Σ_t (log π_old(a_t) − log π_ref(a_t))`, the
    response's k1 estimate of KL(π‖π_ref). Shapes: `scores [B]`, the rest `[B, T]`; returns `[B]`, detached."""
    return scores.detach() - kl_coef * masked_sum((logprobs - ref_logprobs).detach(), mask, dim=1)
