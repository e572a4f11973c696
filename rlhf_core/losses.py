"""Every loss and RL signal of the pipeline, as pure tensor functions.

Conventions (see docs/architecture.md):

- Tensors over response tokens are `[batch, T]`; `mask` is 1 on a real response token and 0 on prompt or
  padding. Rows are right-padded: the real tokens of a row are a contiguous block starting at column 0.
- `logprobs[:, t] = log π(a_t | s_t)` for response token t; `values[:, t] = V(s_t)`, the value of the state
  *before* emitting `a_t`.
- Every reduction over tokens is a masked mean over the valid tokens of the whole batch (token-level mean),
  so a long response weighs more than a short one, as in the PPO and SFT objectives.
- Losses are *minimised*. Diagnostics are returned detached, beside the loss, and are never needed for the
  backward pass.

Sections, in the order the pipeline uses them: masked reductions, SFT, reward model, DPO, PPO
(KL-penalised rewards → GAE → whitening → clipped policy loss → value loss → entropy → total).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------------------


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision logits to float32 (softmax over a large vocabulary loses too much in bf16/fp16);
    float32 and float64 pass through unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """`Σ x·mask` over `dim` (all dims when None).

    Padded entries are selected away with `torch.where`, not multiplied by 0, so a nan/inf sitting in a padded
    position (e.g. the log-prob of a pad token) cannot leak into the sum.
    """
    masked = torch.where(mask.bool(), x * mask, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return masked.sum()
    return masked.sum(dim=dim, keepdim=keepdim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """`Σ x·mask / Σ mask` over `dim` (all dims when None); `mask` is 0/1 and broadcastable to `x`.

    A row (or batch) without any valid entry returns 0, not nan: it holds no token, so it must contribute
    nothing to a loss (the denominator is clamped to ≥ 1 for that reason only).
    """
    mask = mask.to(x.dtype).expand_as(x)
    count = mask.sum() if dim is None else mask.sum(dim=dim, keepdim=keepdim)
    return masked_sum(x, mask, dim, keepdim) / count.clamp(min=1.0)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, keepdim: bool = False, unbiased: bool = True
) -> torch.Tensor:
    """Variance of the valid entries: `Σ mask·(x − μ)² / (n − 1)` (or `/ n` when `unbiased=False`).

    μ = masked_mean(x, mask), n = Σ mask. As with `torch.var`, the unbiased variance of a single valid entry is
    undefined (division by zero).
    """
    mask = mask.to(x.dtype).expand_as(x)
    mean = masked_mean(x, mask, dim, keepdim=True)
    sq_dev_sum = masked_sum((x - mean) ** 2, mask, dim, keepdim)
    count = mask.sum() if dim is None else mask.sum(dim=dim, keepdim=keepdim)
    if unbiased:
        count = count - 1
    return sq_dev_sum / count


# --------------------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------------------


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy on response tokens only.

    Shift convention: `logits`, `labels` and `loss_mask` are all aligned with the *input* sequence
    (`labels` is normally `input_ids` itself). Position t of the logits predicts token t+1, so the shift
    happens here:

        loss = − Σ_{t=1}^{L−1} m_t · log softmax(z_{t−1})[y_t]  /  Σ_{t=1}^{L−1} m_t

    with z = logits `[B, L, V]`, y = labels `[B, L]`, m = loss_mask `[B, L]` (1 on the response tokens whose
    prediction is trained, incl. the final EOS; 0 on prompt and padding). `loss_mask[:, 0]` is ignored: no
    position predicts the first token. Labels under m = 0 are never read (they may be -100 or any id).
    log_softmax runs in (at least) float32 whatever the logits' dtype. `reduction="sum"` returns the numerator only,
    for callers that normalise by the token count of a whole accumulated batch.
    """
    shift_logits = _at_least_float32(logits[:, :-1, :])  # [B, L-1, V]
    shift_mask = loss_mask[:, 1:].to(shift_logits.dtype)  # [B, L-1]
    # Masked labels may be an ignore index (-100): replace them by a valid id so the gather is defined.
    shift_labels = torch.where(shift_mask.bool(), labels[:, 1:], torch.zeros_like(labels[:, 1:]))
    # cross_entropy = −log softmax(z)[y], fused: no second [B, L-1, V] tensor for the log-probs.
    token_logps = -F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none")  # [B, L-1]
    if reduction == "sum":
        return -masked_sum(token_logps, shift_mask)
    if reduction == "mean":
        return -masked_mean(token_logps, shift_mask)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


# --------------------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise reward-model loss: `loss = mean_i −log σ(r_w,i − r_l,i − m_i)`.

    Shapes: `[batch]` each (`margin` optional, `[batch]` or scalar; m = 0 when None). Returns
    `(loss, accuracy)` where accuracy = mean(r_w > r_l), detached; a tie counts as wrong, so an untrained RM
    that outputs constants reads 0, not 0.5.
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    accuracy = (diff.detach() > 0).to(diff.dtype).mean()
    return loss, accuracy


# --------------------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------------------

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference losses on sequence log-probs (each `[batch]`, summed over response tokens).

    With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), the log-ratio difference:

    - `sigmoid` (DPO, Rafailov et al. 2023): `−(1−ε)·log σ(βh) − ε·log σ(−βh)`; ε = `label_smoothing` > 0 is
      conservative DPO (labels flipped with probability ε).
    - `ipo` (Azar et al. 2023, eq. 17 with τ = β): `(h − 1/(2β))²` — h is *not* scaled by β.
    - `hinge` (SLiC, Zhao et al. 2023): `relu(1 − βh)`.

    The loss is the mean over pairs. Returns `(loss, chosen_rewards, rejected_rewards)`, the implicit rewards
    `β·(log π − log π_ref)` of each response, `[batch]`, detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --------------------------------------------------------------------------------------------------------------
# PPO: rollout signals (no gradient)
# --------------------------------------------------------------------------------------------------------------


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last 1 of each row of `mask` `[batch, T]` → `[batch]` (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=1)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: Literal["k1", "k3"] = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of a rollout: a KL penalty on every token plus the RM score on the last one.

        R_t = −β·KL_t + 1[t = last real token]·score

    with β = `kl_coef` and the per-token estimator of KL(π‖π_ref) on the sampled token a_t ~ π:

    - `k1`: KL_t = log π(a_t) − log π_ref(a_t)  (unbiased, can be negative on a single token);
    - `k3`: KL_t = (r − 1) − log r with r = π_ref(a_t)/π(a_t) = exp(ref_logprobs − logprobs)
      (Schulman 2020: unbiased and ≥ 0 on every token).

    Sign: a policy that puts more mass than the reference on its own token (logprobs > ref_logprobs) gets a
    positive KL_t and so a *lower* reward. (The teaching guide writes R_t = r − β·log(π_ref/π), whose sign is
    wrong; its own worked numbers use log π − log π_ref, as here.)

    Shapes: `scores [batch]`; `logprobs`, `ref_logprobs`, `mask` `[batch, T]`. `logprobs` are those of the
    sampling policy (π_old). Returns `(rewards, kl)`, both `[batch, T]`, detached, zero outside the mask.
    A row without any valid token gets no score.
    """
    logprobs, ref_logprobs, scores = logprobs.detach(), ref_logprobs.detach(), scores.detach()
    valid = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the log-ratio on padding first so a -inf/nan log-prob there cannot overflow exp() below.
    log_ratio = torch.where(valid, logprobs - ref_logprobs, zero)  # log π − log π_ref
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        # r = exp(−log_ratio); (r − 1) − log r = expm1(−log_ratio) + log_ratio; expm1 keeps precision near r = 1.
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")

    rewards = -kl_coef * kl
    last = _last_valid_index(mask).unsqueeze(1)  # [batch, 1]
    rewards = rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))
    return torch.where(valid, rewards, zero), kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over each response.

        δ_t = R_t + γ·V_{t+1} − V_t
        A_t = δ_t + γλ·A_{t+1}
        returns_t = A_t + V_t            (the value target)

    The state after the last real token is terminal: V_{t+1} = 0 and A_{t+1} = 0 there, which is what makes
    right-padded rows of different lengths give exactly the result of each row alone. Shapes: `[batch, T]`
    each; returns `(advantages, returns)`, `[batch, T]`, detached, zero outside the mask. The mask must be a
    contiguous block per row (right padding); the loop is over T only, vectorised over the batch.
    """
    rewards, values = rewards.detach(), values.detach()
    valid = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(valid, values, zero)
    rewards = torch.where(valid, rewards, zero)

    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # V_{t+1}, 0 beyond the sequence
    next_advantage = torch.zeros_like(values[:, 0])  # A_{t+1}
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A_{t+1} = 0 on padding, so the last real token of every row sees a terminal next state.
        next_advantage = torch.where(valid[:, t], delta + gamma * gae_lambda * next_advantage, zero)
        advantages[:, t] = next_advantage
        next_value = values[:, t]  # already 0 on padding
    returns = torch.where(valid, advantages + values, zero)
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the valid entries of `x` `[batch, T]` with statistics of the valid entries of the whole batch.

        out = (x − μ) / sqrt(σ² + eps)            (shift_mean=True)
        out = (x − μ) / sqrt(σ² + eps) + μ        (shift_mean=False: rescale only, keep the mean)

    μ = masked_mean(x, mask), σ² = the population variance (÷ n) of the valid entries, so the valid outputs
    have mean 0 and variance 1 (up to eps). Padded entries neither enter μ, σ² nor keep their value: they
    are 0 in the output. Detached only if `x` is.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------------------------
# PPO: losses (with gradient)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossStats:
    """Detached diagnostics of `ppo_policy_loss`, each a 0-dim tensor (call `.as_dict()` for floats).

    clip_frac: fraction of valid tokens where the clipped term is strictly the active one in the min, i.e.
        A > 0 and ρ > 1+ε, or A < 0 and ρ < 1−ε: exactly the tokens that get zero policy gradient. (A ratio
        outside the band whose unclipped term is still the min — e.g. A > 0, ρ < 1−ε — is not counted.)
    approx_kl: k3 estimate of KL(π_old‖π_new) = mean((ρ − 1) − log ρ) over valid tokens, ≥ 0.
    ratio_mean: mean of ρ = π_new/π_old over valid tokens (1 on the first minibatch of an epoch).
    """

    clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {
            "clip_frac": float(self.clip_frac),
            "approx_kl": float(self.approx_kl),
            "ratio_mean": float(self.ratio_mean),
        }


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped surrogate loss (Schulman et al. 2017), to minimise:

        ρ_t  = exp(log π_new(a_t) − log π_old(a_t))
        loss = −masked_mean( min(ρ_t·A_t, clip(ρ_t, 1−ε, 1+ε)·A_t) )

    Shapes: `[batch, T]` each; `old_logprobs` and `advantages` are constants (detached here). Returns
    `(loss, PolicyLossStats)`.
    """
    advantages = advantages.detach()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Select (not multiply) on padding: the gradient of a garbage log-ratio or advantage there then stops at
    # this `where` instead of reaching `logprobs` as nan·0 = nan.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)

    with torch.no_grad():
        stats = PolicyLossStats(
            clip_frac=masked_mean((clipped < unclipped).to(ratio.dtype), mask),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss, stats


@dataclass(frozen=True)
class ValueLossStats:
    """Detached diagnostics of `value_loss`, each a 0-dim tensor (call `.as_dict()` for floats).

    clip_frac: fraction of valid tokens where the clipped squared error is strictly the larger one (the
        token's value gradient is zero); 0 when no clip range is given.
    mse: masked_mean((V − G)²) of the unclipped prediction, the critic's error whatever the clipping.
    """

    clip_frac: torch.Tensor
    mse: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {"clip_frac": float(self.clip_frac), "mse": float(self.mse)}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = None,
) -> tuple[torch.Tensor, ValueLossStats]:
    """Critic regression loss, with the ½ of a squared error (its gradient is then V − G):

        loss = ½·masked_mean((V − G)²)                                        (clip_range None)
        V_clip = V_old + clamp(V − V_old, −c, c)
        loss = ½·masked_mean(max((V − G)², (V_clip − G)²))                    (clip_range c)

    G = `returns` (value targets from `gae`), V_old = the rollout's values. Shapes: `[batch, T]` each;
    `old_values` and `returns` are constants (detached here). Returns `(loss, ValueLossStats)`.
    """
    valid = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # Zero garbage on padding so it cannot reach the gradient as nan·0 (see ppo_policy_loss).
    old_values = torch.where(valid, old_values.detach(), zero)
    returns = torch.where(valid, returns.detach(), zero)
    sq_err = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * masked_mean(sq_err, mask)
        clip_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        sq_err_clipped = (values_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.maximum(sq_err, sq_err_clipped), mask)
        clip_frac = masked_mean((sq_err_clipped > sq_err).to(values.dtype), mask).detach()
    return loss, ValueLossStats(clip_frac=clip_frac, mse=masked_mean(sq_err.detach(), mask))


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean categorical entropy of the next-token distributions over valid tokens.

        H_t = −Σ_v p_v·log p_v = logsumexp(z) − Σ_v p_v·z_v,   p = softmax(z)
        out = masked_mean(H, mask)

    The second form never takes log of a vanishing probability. `logits` `[batch, T, V]` (the positions that
    predict response tokens), `mask` `[batch, T]`; computed in (at least) float32. Differentiable: it is the
    entropy bonus.
    """
    z = _at_least_float32(logits)
    token_entropy = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)  # [batch, T]
    return masked_mean(token_entropy, mask)


def ppo_total_loss(
    policy_loss: torch.Tensor,
    value_loss: torch.Tensor,
    entropy: torch.Tensor,
    vf_coef: float,
    ent_coef: float,
) -> torch.Tensor:
    """The PPO loss to minimise: `policy_loss + c1·value_loss − c2·entropy` (c1 = vf_coef, c2 = ent_coef).

    The paper (and the teaching guide) write the objective to *maximise*,
    `L = L_CLIP − c1·L_VF + c2·S`; since `policy_loss = −L_CLIP`, this function returns exactly −L.
    """
    return policy_loss + vf_coef * value_loss - ent_coef * entropy
