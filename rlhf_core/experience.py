"""PPO's outer loop as one unit: rollout → score → KL-penalised rewards → GAE, stored as an `Experience`.

    1. sample     responses from the current policy π_old (`generation.generate`, temperature τ, no top-k/top-p)
                  keeping the sampler's own log-probs  log π_old(a_t | s_t)
    2. forward    values V(s_t) of the critic (and, with `old_logprobs="forward"`, log π_old(a_t | s_t) from the
                  same pass) and log π_ref(a_t | s_t) of the frozen reference (same τ). A critic that shares
                  the policy's body (`PolicyWithValueHead`) reads V(s_t) off the sampler's own hidden states
                  in step 1 instead (the same states a forward pass would compute), so with the sampler's
                  log-probs no critic pass is needed
    3. score      the RM on prompt + response and/or reward functions of the text (`rewards.RewardScorer`), then
                  shaping: normalise with running moments, clip, and replace the score of a response that never
                  emitted EOS by a fixed value
    4. rewards    R_t = −β·KL_t + 1[t = last]·score              (`losses.kl_penalized_rewards`)
    5. GAE        A_t, returns_t = A_t + V(s_t)                  (`losses.gae`)

Nothing here has a gradient: the inner loop (`trainers/ppo.py`) re-runs the policy on the stored tokens.

Shapes: `B` rollouts, `P` longest prompt (left-padded), `T` longest response (right-padded); tensors over response
tokens are `[B, T]` with `response_mask` 1 on real response tokens (the EOS that ended a row included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf_core.generation import GenerationOutput, SamplingConfig, generate
from rlhf_core.logprobs import response_forward
from rlhf_core.losses import gae, kl_penalized_rewards, masked_mean, masked_sum
from rlhf_core.models import PolicyWithValueHead
from rlhf_core.rewards import RewardScorer, as_scorer
from rlhf_core.tokenization import Conversation
from rlhf_core.trainers.common import reference_model

ScoreNorm = Literal["none", "std", "mean_std"]
KLEstimator = Literal["k1", "k3"]


@dataclass(frozen=True)
class ExperienceConfig:
    """How one batch of experience is collected and turned into advantages."""

    max_new_tokens: int = 64
    """Longest response; a row cut here did not emit EOS (`ended_with_eos = False`)."""
    temperature: float = 1.0
    """Sampling temperature; the policy, old and reference log-probs are all of `softmax(logits / τ)`."""
    max_prompt_len: int | None = 256
    """Keep the last this-many prompt tokens (None: no limit)."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator of the penalty: "k1" = log π − log π_ref, "k3" = (r − 1) − log r."""
    gamma: float = 1.0
    """Discount of GAE (1: the episode is one short response; no discounting)."""
    gae_lambda: float = 0.95
    """GAE λ: 0 = one-step TD advantages (low variance, biased), 1 = Monte-Carlo returns minus V."""
    missing_eos_score: float | None = -1.0
    """Score given instead of the (shaped) RM score to a response that never emitted EOS (None: no penalty)."""
    score_norm: ScoreNorm = "none"
    """Normalise RM scores with running moments: "std" divides by σ, "mean_std" computes (s − μ)/σ."""
    score_clip: float | None = None
    """Clip the (normalised) score to [−c, c] (None: no clipping)."""
    old_logprobs: Literal["sampler", "forward"] = "sampler"
    """Where log π_old comes from: "sampler", the sampler's own (exact in float32); "forward", the critic's full
    forward pass over the rollout, the same computation as the updates' — under bf16 the sampler's incremental
    decoding rounds differently, and the first update would see a ratio ≠ 1 (docs/pitfalls.md §1)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature <= 0:
            raise ValueError(
                f"need max_new_tokens >= 1 and temperature > 0, got {self.max_new_tokens}, {self.temperature}"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.gae_lambda <= 1.0):
            raise ValueError(f"gamma and gae_lambda must be in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if self.score_norm not in ("none", "std", "mean_std"):
            raise ValueError(f"score_norm must be 'none', 'std' or 'mean_std', got {self.score_norm!r}")
        if self.old_logprobs not in ("sampler", "forward"):
            raise ValueError(f"old_logprobs must be 'sampler' or 'forward', got {self.old_logprobs!r}")
        if self.score_clip is not None and not self.score_clip > 0:
            raise ValueError(f"score_clip must be > 0 or None, got {self.score_clip}")

    def sampling(self, seed: int | None) -> SamplingConfig:
        """The rollout sampler: pure temperature sampling, no top-k/top-p (their truncated distribution is not
        the policy the loss differentiates, docs/pitfalls.md §1)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)


@dataclass
class Experience:
    """One PPO buffer: what the inner loop trains on. Every tensor's first dimension is the rollout `B`.

    Token-level tensors are `[B, T]`, aligned as in `losses` (`x[:, t]` belongs to response token a_t; `values`
    is V(s_t), the state *before* a_t) and zero where `response_mask` is 0.
    """

    prompt_ids: torch.Tensor
    """`[B, P]` left-padded prompt ids."""
    prompt_attention_mask: torch.Tensor
    """`[B, P]` 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """`[B, T]` sampled response ids, right-padded."""
    response_mask: torch.Tensor
    """`[B, T]` 1 on real response tokens (incl. the final EOS)."""
    old_logprobs: torch.Tensor
    """`[B, T]` log π_old(a_t | s_t): the sampler's log-probs (temperature τ)."""
    ref_logprobs: torch.Tensor
    """`[B, T]` log π_ref(a_t | s_t) of the frozen reference (temperature τ)."""
    old_values: torch.Tensor
    """`[B, T]` V_old(s_t) of the critic at rollout time (float32)."""
    rm_scores: torch.Tensor
    """`[B]` raw scores (the reward model's, or the weighted sum of `rewards.RewardScorer`), before shaping."""
    scores: torch.Tensor
    """`[B]` shaped scores that enter the rewards (normalised, clipped, no-EOS penalty)."""
    ended_with_eos: torch.Tensor
    """`[B]` bool: the response emitted EOS before `max_new_tokens`."""
    kl: torch.Tensor
    """`[B, T]` per-token KL estimate of the penalty (k1 or k3)."""
    rewards: torch.Tensor
    """`[B, T]` R_t = −β·KL_t (+ score on the last real token)."""
    advantages: torch.Tensor
    """`[B, T]` GAE advantages, not whitened."""
    returns: torch.Tensor
    """`[B, T]` value targets A_t + V_old(s_t)."""

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, indices: torch.Tensor | Sequence[int]) -> Experience:
        """The rows `indices` as a smaller `Experience` (a minibatch; `select_rows`)."""
        return select_rows(self, indices)

    def to(self, device: torch.device | str) -> Experience:
        return Experience(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def select_rows(batch: Any, indices: torch.Tensor | Sequence[int]) -> Any:
    """The rows `indices` of a dataclass of row-first tensors with `prompt_*` (left-padded) and `response_mask`
    fields, as a new one of its type, with the padding columns no selected row uses dropped (leading prompt
    pads, trailing columns of every `[B, T]` response tensor), so a minibatch of short responses is cheap.
    Columns are only removed where every selected row is padding, so no value changes."""
    index = torch.as_tensor(indices, dtype=torch.long, device=batch.response_ids.device)
    prompt_used = batch.prompt_attention_mask[index].bool().any(0)
    first_prompt_col = int(prompt_used.nonzero()[0]) if bool(prompt_used.any()) else 0
    response_len = max(int(batch.response_mask[index].sum(1).max()), 1)
    picked: dict[str, torch.Tensor] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)[index]
        if f.name.startswith("prompt_"):
            value = value[:, first_prompt_col:]
        elif value.dim() == 2:
            value = value[:, :response_len]
        picked[f.name] = value
    return type(batch)(**picked)


class RunningMoments:
    """Running mean and variance of every score seen so far (Chan et al.'s parallel update of Welford's
    algorithm), for score normalisation. `state_dict()` is JSON-serialisable, for exact resume."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: torch.Tensor) -> None:
        """Merge the batch `x` (any shape) into the moments; `var` is the population variance (÷ n)."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        if self.count == 0:
            self.mean, self.var = batch_mean, batch_var
        else:
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
            self.mean, self.var = self.mean + delta * n / total, m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def shape_scores(
    rm_scores: torch.Tensor,
    ended_with_eos: torch.Tensor,
    config: ExperienceConfig,
    moments: RunningMoments | None = None,
) -> torch.Tensor:
    """RM scores `[B]` → the scores that enter the rewards `[B]`, in this order:

    1. normalise   "std": s / σ;  "mean_std": (s − μ) / σ   (μ, σ: running moments, updated with this batch
                   first, so the very first batch is normalised by its own statistics)
    2. clip        clamp(s, −c, c)
    3. no EOS      s := missing_eos_score for every response that never ended (docs/pitfalls.md §5); after the
                   normalisation, so the penalty is on the scale the policy sees
    """
    scores = rm_scores.float()
    if config.score_norm != "none":
        if moments is None:
            raise ValueError(f"score_norm={config.score_norm!r} needs running moments")
        moments.update(scores)
        # σ floor: a batch of identical scores would otherwise divide by 0.
        std = max(moments.std, 1e-8)
        scores = (scores - moments.mean) / std if config.score_norm == "mean_std" else scores / std
    if config.score_clip is not None:
        scores = scores.clamp(-config.score_clip, config.score_clip)
    if config.missing_eos_score is not None:
        scores = torch.where(ended_with_eos.bool(), scores, torch.full_like(scores, config.missing_eos_score))
    return scores


@torch.no_grad()
def reference_logprobs(
    actor: nn.Module, reference: nn.Module | None, rollout: GenerationOutput, temperature: float
) -> torch.Tensor:
    """log π_ref(a_t | s_t) `[B, T]` of the rollout's responses. `reference=None`: `actor` is a LoRA (peft)
    model and π_ref is the same model with its adapters disabled."""
    with reference_model(actor, reference) as ref:
        return response_forward(
            ref,
            rollout.prompt_ids,
            rollout.prompt_attention_mask,
            rollout.response_ids,
            rollout.response_mask,
            temperature,
        ).logprobs


@torch.no_grad()
def critic_forward(
    model: nn.Module, rollout: GenerationOutput, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(values, logprobs)`, each `[B, T]`: V(s_t) (float32) and log π(a_t | s_t) from one forward pass of the
    actor-critic `model` (forward → `(logits, values)`) over the rollout, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        out = response_forward(
            model,
            rollout.prompt_ids,
            rollout.prompt_attention_mask,
            rollout.response_ids,
            rollout.response_mask,
            temperature,
        )
    finally:
        model.train(was_training)
    if out.values is None:
        raise ValueError(f"{type(model).__name__} returned no values: PPO needs an actor-critic model")
    return out.values.float(), out.logprobs


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response KL `[B]`: the per-token estimates `[B, T]` summed over the response's tokens."""
    return masked_sum(kl, mask, dim=1)


def make_experience(
    model: nn.Module,
    actor: nn.Module,
    reference: nn.Module | None,
    scorer: RewardScorer | nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Conversation],
    config: ExperienceConfig,
    kl_coef: float,
    moments: RunningMoments | None = None,
    seed: int | None = None,
    timings: dict[str, float] | None = None,
) -> Experience:
    """Collect one batch of experience (steps 1–5 of the module docstring) from `prompts`.

    `model` is the actor-critic (forward → `(logits, values)`); `actor` the causal LM inside it that samples;
    `reference` the frozen π_ref (None: `actor` is a LoRA model, π_ref = adapters disabled); `scorer` the reward
    (`rewards.RewardScorer`: RM and/or reward functions; a bare reward model means 1 · RM); `kl_coef` the β of
    this iteration; `seed` seeds the sampler (None: the global torch RNG); `timings`, when given, receives the
    seconds spent sampling (`generation_s`; a shared-body critic's values are read there) and in the critic,
    reference and reward forwards (`scoring_s`).
    """
    started = time.perf_counter()
    # 1. sample: the old log-probs are the sampler's own (docs/pitfalls.md §1); a shared-body critic's values too
    values_from_sampler = isinstance(model, PolicyWithValueHead) and config.old_logprobs == "sampler"
    rollout = generate(
        model if values_from_sampler else actor,
        tokenizer,
        prompts,
        config.sampling(seed),
        max_prompt_len=config.max_prompt_len,
        values=values_from_sampler,
    )
    response_mask = rollout.response_mask
    sampled = time.perf_counter()
    # 2. forward passes of the critic (unless the sampler gave its values) and the reference on the sampled tokens
    if rollout.values is not None:
        old_values, old_logprobs = rollout.values, rollout.logprobs
    else:
        old_values, forward_logprobs = critic_forward(model, rollout, config.temperature)
        old_logprobs = rollout.logprobs if config.old_logprobs == "sampler" else forward_logprobs
    ref_logprobs = reference_logprobs(actor, reference, rollout, config.temperature)
    # 3. score and shape
    rm_scores = as_scorer(scorer)(prompts, rollout)
    scores = shape_scores(rm_scores, rollout.ended_with_eos, config, moments)
    if timings is not None:
        timings.update(generation_s=sampled - started, scoring_s=time.perf_counter() - sampled)
    # 4. per-token rewards with the KL penalty
    rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, response_mask, kl_coef, config.kl_estimator)
    # 5. advantages and value targets
    advantages, returns = gae(rewards, old_values, response_mask, config.gamma, config.gae_lambda)
    valid = response_mask.bool()
    return Experience(
        prompt_ids=rollout.prompt_ids,
        prompt_attention_mask=rollout.prompt_attention_mask,
        response_ids=rollout.response_ids,
        response_mask=response_mask,
        old_logprobs=torch.where(valid, old_logprobs, torch.zeros((), dtype=old_logprobs.dtype)),
        ref_logprobs=torch.where(valid, ref_logprobs, torch.zeros((), dtype=ref_logprobs.dtype)),
        old_values=torch.where(valid, old_values, torch.zeros((), dtype=old_values.dtype)),
        rm_scores=rm_scores,
        scores=scores,
        ended_with_eos=rollout.ended_with_eos,
        kl=torch.where(valid, kl, torch.zeros((), dtype=kl.dtype)),
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )


def distinct_n(sequences: Sequence[Sequence[Any]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over a set of token sequences (0 when there
    are none). Low values mean the responses repeat themselves or each other (mode collapse, docs/pitfalls.md §3)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def response_token_lists(experience: Experience | GenerationOutput) -> list[list[int]]:
    """The real response ids of every row, as Python lists."""
    return [
        ids[mask.bool()].tolist() for ids, mask in zip(experience.response_ids, experience.response_mask, strict=True)
    ]


def experience_metrics(experience: Experience) -> dict[str, float]:
    """Rollout diagnostics (un-prefixed): RM score, per-response KL and penalised return, length, no-EOS share,
    distinct-2, and explained variance of the critic's values (CleanRL's
    `1 − Var(returns − V) / Var(returns)`, over valid tokens; 1 = perfect, ≤ 0 = no better than a constant)."""
    mask = experience.response_mask
    returns, values = experience.returns, experience.old_values
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    explained = 1.0 - float(var_residual) / float(var_returns) if float(var_returns) > 0 else float("nan")
    return {
        "score_mean": float(experience.rm_scores.mean()),
        "score_std": float(experience.rm_scores.std()) if len(experience) > 1 else 0.0,
        "shaped_score_mean": float(experience.scores.mean()),
        "shaped_score_std": float(experience.scores.std()) if len(experience) > 1 else 0.0,
        "kl": float(sequence_kl(experience.kl, mask).mean()),
        "reward_mean": float(masked_sum(experience.rewards, mask, dim=1).mean()),
        "value_mean": float(masked_mean(values, mask)),
        "return_mean": float(masked_mean(returns, mask)),
        "explained_variance": explained,
        "response_length": float(mask.sum(1).float().mean()),
        "no_eos_fraction": float((~experience.ended_with_eos.bool()).float().mean()),
        "distinct_2": distinct_n(response_token_lists(experience), 2),
    }
