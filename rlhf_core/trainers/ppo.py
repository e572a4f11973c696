"""PPO for RLHF: the actor-critic of the teaching guide, trained against a frozen reward model with a KL penalty
to a frozen reference (the SFT model).

    for iteration in range(max_steps):
        # outer loop: experience (rlhf_core.experience.make_experience)
        prompts  ← next rollout_batch_size prompts
        y ~ π_old(·|x)  with log π_old(a_t|s_t);   V_old(s_t);   log π_ref(a_t|s_t);   score = RM(x, y)
        R_t = −β·KL_t + 1[t = last]·shape(score);   A_t, returns_t = GAE(R, V_old)
        # inner loop
        for epoch in range(ppo_epochs):
            for minibatch in shuffle(experience):
                loss = policy_loss(ρ, Â) + vf_coef·value_loss(V, returns) − ent_coef·entropy
                step AdamW (gradient clipped)
        β ← KL controller(KL measured in the rollout)

`loss = −L_clip + c1·L_vf − c2·S` (`losses.ppo_total_loss`); Â = whitened advantages.

Models. The actor-critic is one module whose forward returns `(logits, values)`:
- `critic="shared"` (default): `PolicyWithValueHead`, one body with an LM head and a scalar value head;
- `critic="separate"`: `PolicyAndCritic`, the policy plus a critic initialised from the reward model (its
  score head read at every position gives V(s_t)). Both live in `rlhf_core/models.py`; the reward-model and
  dead-signal guards in `rlhf_core/guards.py`.
The reward model and the reference are frozen; with LoRA the reference is the policy with adapters disabled.
Dropout is off in every model (docs/pitfalls.md §6).

Batch sizes. `rollout_batch_size` prompts per iteration (over all processes); one optimizer update consumes a
minibatch of `batch_size × grad_accum_steps × num_processes` rollouts (each process its share, `batch_size` per
forward), so an epoch is `rollout_batch_size / minibatch` updates. `max_steps`, `checkpoint_every`, `log_every`,
`eval_every` and the learning-rate schedule count iterations.

Resume. A checkpoint (every `checkpoint_every` iterations) holds the actor-critic, optimizer, scheduler, RNG
and, in `trainer_state.json`, the iteration, the prompt-stream position, the KL controller and the score
moments. Sampling and minibatch shuffles draw from generators seeded by `(seed, iteration, process)`, so a
resumed run follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.callbacks import MetricLogger
from rlhf_core.experience import (
    Experience,
    ExperienceConfig,
    KLEstimator,
    RunningMoments,
    ScoreNorm,
    experience_metrics,
    make_experience,
    reference_logprobs,
    sequence_kl,
)
from rlhf_core.generation import generate
from rlhf_core.guards import DeadSignalError, check_reward_model, reward_signal_problem
from rlhf_core.kl_control import AdaptiveKLController, FixedKLController, KLController
from rlhf_core.lengths import Auto, resolve_from_rows, unresolved
from rlhf_core.logprobs import response_forward
from rlhf_core.losses import entropy_from_logits, ppo_policy_loss, ppo_total_loss, value_loss, whiten
from rlhf_core.models import (
    PolicyAndCritic,
    PolicyWithValueHead,
    disable_dropout,
    load_reward_model,
)
from rlhf_core.rewards import RewardScorer, build_scorer
from rlhf_core.trainers.common import (
    EpochPermutationSampler,
    Session,
    TrainerConfig,
    TrainResult,
    TrainState,
    all_reduce_sum,
    apply_lora,
    backward_normalized,
    check_length_limits,
    ensure_finite,
    freeze,
    make_accelerator,
    maybe_checkpoint,
    peak_memory_mb,
    progress_bar,
    save_final_model,
    set_seed,
    start_session,
)

CriticKind = Literal["shared", "separate"]


@dataclass(frozen=True)
class PPOConfig(TrainerConfig):
    """PPO hyper-parameters (plus the shared `TrainerConfig` fields; `max_steps` counts PPO iterations)."""

    max_steps: int = 100
    """Number of PPO iterations (one rollout batch + `ppo_epochs` of updates each)."""
    batch_size: int = 8
    """Rollouts per forward/backward pass of the inner loop on one process (the micro-batch)."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW (actor and critic)."""
    rollout_batch_size: int = 64
    """Prompts sampled per iteration, over all processes."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    clip_eps: float = 0.2
    """ε of the clipped surrogate: the ratio π/π_old is clipped to [1 − ε, 1 + ε]."""
    vf_coef: float = 0.5
    """c1: weight of the value loss in the total loss."""
    value_clip_range: float | None = None
    """Clip V − V_old to ±this in the value loss (None: plain squared error). Off by default: on the raw score
    scale it caps how far the critic moves per iteration, and a fresh value head has far to go."""
    ent_coef: float = 0.0
    """c2: weight of the entropy bonus."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0 / std 1 over the rollout's valid tokens before the updates."""
    gamma: float = 1.0
    """Discount of GAE."""
    gae_lambda: float = 0.95
    """λ of GAE."""
    kl_coef: float = 0.05
    """β of the KL penalty (initial value when `target_kl` is set)."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator of the penalty: "k1" or "k3" (see `losses.kl_penalized_rewards`)."""
    target_kl: float | None = None
    """Adaptive KL control towards this per-response KL (None: β stays at `kl_coef`)."""
    kl_horizon: float = 10000.0
    """Horizon (in episodes) of the adaptive KL controller."""
    max_new_tokens: int | Auto = 64
    """Longest sampled response ("auto": from the demonstrations' lengths, resolved by the pipeline,
    `rlhf_core.lengths`)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the losses use the same tempered distribution)."""
    max_prompt_len: int | Auto | None = "auto"
    """Keep the last this-many prompt tokens (None: no limit; "auto": cover 95% of the prompts)."""
    missing_eos_score: float | None = -1.0
    """Score that replaces the RM's for a response without EOS (None: no penalty)."""
    score_norm: ScoreNorm = "none"
    """Running normalisation of RM scores: "none", "std" (s/σ) or "mean_std" ((s − μ)/σ)."""
    score_clip: float | None = None
    """Clip the normalised score to ±this (None: no clipping)."""
    critic: CriticKind = "shared"
    """"shared": value head on the policy body; "separate": a critic initialised from the reward model."""
    value_learning_rate: float | None = None
    """Peak learning rate of the critic-only parameters (the value head, or the separate critic); None: 20 × the
    policy's `learning_rate`. A fresh value head starts from nothing while the policy should barely move: at the
    policy's rate it cannot follow the returns within a run (docs/pitfalls.md, "A critic that never learns")."""
    value_warmup_iterations: int = 2
    """First iterations that update only the critic (value head, or the separate critic); the policy waits."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score in the reward (0: no reward model; then `reward_functions` alone)."""
    reward_functions: dict[str, float] = field(default_factory=dict)
    """`{"module:function": weight}`: functions `f(prompt, response_text) -> float` added to the reward (imports and
    runs that code; `rlhf_core.rewards`)."""
    dead_signal: Literal["raise", "warn"] = "raise"
    """What to do when the first `dead_signal_iterations` rollouts carry no reward signal (scores all equal, or
    ≥ 90% of responses cut before EOS): stop with the reason and the fix, or warn and go on."""
    dead_signal_iterations: int = 2
    """How many first iterations the dead-signal check looks at (0: no check)."""
    min_reward_model_accuracy: float = 0.55
    """Held-out pairwise accuracy below which the reward model counts as at chance (docs/pitfalls.md §2)."""
    weak_reward_model: Literal["raise", "warn"] = "raise"
    """What to do with a reward model below `min_reward_model_accuracy`: refuse to start, or warn."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_length_limits(self, "max_prompt_len", "max_new_tokens")
        if not unresolved(self):
            self.experience_config()  # validates the rollout fields
        minibatch = self.batch_size * self.grad_accum_steps
        if self.rollout_batch_size <= 0 or self.rollout_batch_size % minibatch:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a positive multiple of "
                             f"batch_size × grad_accum_steps ({minibatch})")
        if self.ppo_epochs <= 0 or not self.clip_eps > 0 or self.vf_coef < 0 or self.ent_coef < 0:
            raise ValueError("need ppo_epochs > 0, clip_eps > 0, vf_coef >= 0 and ent_coef >= 0")
        if self.value_clip_range is not None and not self.value_clip_range > 0:
            raise ValueError(f"value_clip_range must be > 0 or None, got {self.value_clip_range}")
        if self.kl_coef < 0 or (self.target_kl is not None and (self.target_kl <= 0 or self.kl_coef <= 0)):
            raise ValueError("need kl_coef >= 0, and target_kl > 0 with kl_coef > 0 for adaptive control")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"critic must be 'shared' or 'separate', got {self.critic!r}")
        if self.value_warmup_iterations < 0 or self.weak_reward_model not in ("raise", "warn"):
            raise ValueError("need value_warmup_iterations >= 0 and weak_reward_model in ('raise', 'warn')")
        self._check_reward_fields()

    def _check_reward_fields(self) -> None:
        if self.dead_signal not in ("raise", "warn") or self.dead_signal_iterations < 0:
            raise ValueError("need dead_signal in ('raise', 'warn') and dead_signal_iterations >= 0")
        if self.reward_model_weight < 0:
            raise ValueError(f"reward_model_weight must be >= 0, got {self.reward_model_weight}")
        if any(":" not in spec for spec in self.reward_functions):
            raise ValueError(f"reward_functions keys must be 'module:function', got {list(self.reward_functions)}")
        if self.reward_model_weight == 0 and not self.reward_functions:
            raise ValueError("reward_model_weight is 0 and there are no reward_functions: nothing to optimise")
        if self.reward_model_weight == 0 and self.critic == "separate":
            raise ValueError("critic='separate' starts the critic from the reward model: it needs "
                             "reward_model_weight > 0")
        if self.value_learning_rate is not None and not self.value_learning_rate > 0:
            raise ValueError(f"value_learning_rate must be > 0 or None, got {self.value_learning_rate}")

    @property
    def uses_reward_model(self) -> bool:
        return self.reward_model_weight > 0

    def experience_config(self) -> ExperienceConfig:
        if unresolved(self):
            raise ValueError(f"PPO lengths {unresolved(self)} are 'auto': resolve them from the data first "
                             "(rlhf_core.lengths.resolve_lengths; the pipeline does) or set integers")
        return ExperienceConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, max_prompt_len=self.max_prompt_len,
            kl_estimator=self.kl_estimator, gamma=self.gamma, gae_lambda=self.gae_lambda,
            missing_eos_score=self.missing_eos_score, score_norm=self.score_norm, score_clip=self.score_clip,
        )


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def build_actor_critic(config: PPOConfig, sft_model_path: str | Path, reward_model_path: str | Path) -> nn.Module:
    """The trained module: the SFT policy (with LoRA adapters if configured) and its critic (see the module
    docstring), dropout off, float32 master weights."""
    actor = disable_dropout(
        AutoModelForCausalLM.from_pretrained(sft_model_path, dtype=torch.float32, use_safetensors=True)
    )
    if config.lora is not None:
        actor = apply_lora(actor, config.lora)
    if config.critic == "shared":
        return PolicyWithValueHead(actor, seed=config.seed)
    critic = disable_dropout(load_reward_model(reward_model_path, dtype=torch.float32))
    return PolicyAndCritic(actor, critic)


def critic_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that only the critic uses (value head, or the separate critic's whole body)."""
    critic = model.value_head if isinstance(model, PolicyWithValueHead) else model.critic
    return list(critic.parameters())


def make_kl_controller(config: PPOConfig) -> KLController:
    if config.target_kl is None:
        return FixedKLController(config.kl_coef)
    return AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)


# --------------------------------------------------------------------------------------------------------------
# The inner loop
# --------------------------------------------------------------------------------------------------------------


def iteration_seed(seed: int, iteration: int, process_index: int, purpose: int) -> int:
    """A 63-bit seed for one use (`purpose`: 0 sampling, 1 shuffling, 2 evaluation) in one iteration of one
    process: a pure function of its arguments, which is what makes resume exact."""
    state = np.random.SeedSequence([seed, iteration, process_index, purpose]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def ppo_losses(
    model: nn.Module, minibatch: Experience, config: PPOConfig, critic_only: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of one micro-batch (a token mean) and its detached diagnostics.

    `loss = policy_loss + vf_coef·value_loss − ent_coef·entropy`; during the value warm-up (`critic_only`)
    `loss = vf_coef·value_loss`. Every diagnostic is computed either way, so metric names never change.
    """
    mb, mask = minibatch, minibatch.response_mask
    out = response_forward(model, mb.prompt_ids, mb.prompt_attention_mask, mb.response_ids, mask,
                           config.temperature)
    policy_loss, policy_stats = ppo_policy_loss(out.logprobs, mb.old_logprobs, mb.advantages, mask, config.clip_eps)
    critic_loss, critic_stats = value_loss(out.values, mb.old_values, mb.returns, mask, config.value_clip_range)
    entropy = entropy_from_logits(out.logits, mask)
    if critic_only:
        loss = config.vf_coef * critic_loss
    else:
        loss = ppo_total_loss(policy_loss, critic_loss, entropy, config.vf_coef, config.ent_coef)
    stats = {
        "loss": float(loss.detach()),
        "policy_loss": float(policy_loss.detach()),
        "value_loss": float(critic_loss.detach()),
        "entropy": float(entropy.detach()),
        "clip_fraction": float(policy_stats.clip_frac),
        "approx_kl": float(policy_stats.approx_kl),
        "ratio_mean": float(policy_stats.ratio_mean),
        "value_clip_fraction": float(critic_stats.clip_frac),
    }
    return loss, stats


def apply_gradients(session: Session) -> float:
    """Clip the accumulated gradient, stop on a non-finite norm, step AdamW and clear; returns ‖g‖ before
    clipping. (Unlike `common.optimizer_step` it does not advance the schedule: PPO steps it per iteration.)"""
    accelerator, config = session.accelerator, session.config
    params = [p for p in session.model.parameters() if p.requires_grad]
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
    grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
    if accelerator.scaler is None:
        ensure_finite(session, grad_norm, "gradient norm")
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def minibatch_update(
    session: Session, experience: Experience, indices: torch.Tensor, config: PPOConfig, critic_only: bool
) -> dict[str, float]:
    """One optimizer update on the rows `indices`: `grad_accum_steps` micro-batches of `batch_size`, the loss a
    token mean over the whole minibatch (all processes). Returns token-weighted mean diagnostics."""
    accelerator = session.accelerator
    micro_batches = [experience.select(chunk) for chunk in indices.split(config.batch_size)]
    local_tokens = float(sum(float(mb.response_mask.sum()) for mb in micro_batches))
    global_tokens = all_reduce_sum(accelerator, {"n": local_tokens})["n"]
    sums: dict[str, float] = {}
    for mb in micro_batches:
        n_tokens = float(mb.response_mask.sum())
        with accelerator.accumulate(session.model):
            loss, stats = ppo_losses(session.model, mb, config, critic_only)
            backward_normalized(session, loss * n_tokens, global_tokens)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value * n_tokens
    sums = all_reduce_sum(accelerator, sums)
    metrics = {key: value / max(global_tokens, 1.0) for key, value in sums.items()}
    ensure_finite(session, metrics["loss"], "loss")
    if critic_only:
        # The shared body got value-loss gradients too; dropping them leaves AdamW to update the critic only.
        keep = {id(p) for p in critic_parameters(session.unwrapped)}
        for p in session.model.parameters():
            if id(p) not in keep:
                p.grad = None
    metrics["grad_norm"] = apply_gradients(session)
    return metrics


def ppo_update(
    session: Session, experience: Experience, config: PPOConfig, seed: int, critic_only: bool
) -> dict[str, float]:
    """The inner loop: `ppo_epochs` passes over the experience in shuffled minibatches. Advantages are whitened
    once over the whole rollout (docs/pitfalls.md §10). Returns the diagnostics averaged over all updates."""
    if config.whiten_advantages:
        experience = replace(experience, advantages=whiten(experience.advantages, experience.response_mask))
    rows_per_update = config.batch_size * config.grad_accum_steps
    generator = torch.Generator().manual_seed(seed)
    session.model.train()  # dropout is disabled in every config, so train mode changes no number
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(experience), generator=generator)
        for indices in order.split(rows_per_update):
            for key, value in minibatch_update(session, experience, indices, config, critic_only).items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    return {key: value / updates for key, value in totals.items()}


# --------------------------------------------------------------------------------------------------------------
# Evaluation during training, metrics, final save
# --------------------------------------------------------------------------------------------------------------


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def evaluate_on_prompts(
    session: Session,
    reference: nn.Module | None,
    scorer: RewardScorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    config: PPOConfig,
) -> dict[str, float]:
    """Reward score (RM and/or reward functions, before shaping), per-response KL to the reference, length and no-EOS share of the current policy on held-out
    prompts (the same sampling seed at every evaluation, so evaluations compare), as `ppo/eval_*`."""
    accelerator = session.accelerator
    actor = session.unwrapped.pretrained_model
    xcfg = config.experience_config()
    shard = list(prompts)[accelerator.process_index :: accelerator.num_processes]
    sums = {"score": 0.0, "kl": 0.0, "length": 0.0, "no_eos": 0.0, "count": 0.0}
    for i, chunk in enumerate(_batches(shard, config.eval_batch_size or config.batch_size)):
        rollout = generate(actor, tokenizer, chunk, xcfg.sampling(iteration_seed(config.seed, i, accelerator.
                           process_index, 2)), max_prompt_len=config.max_prompt_len)
        ref = reference_logprobs(actor, reference, rollout, config.temperature)
        sums["score"] += float(scorer(chunk, rollout).sum())
        sums["kl"] += float(sequence_kl(rollout.logprobs - ref, rollout.response_mask).sum())
        sums["length"] += float(rollout.response_mask.sum())
        sums["no_eos"] += float((~rollout.ended_with_eos).sum())
        sums["count"] += len(chunk)
    sums = all_reduce_sum(accelerator, sums)
    n = max(sums["count"], 1.0)
    return {"ppo/eval_score_mean": sums["score"] / n, "ppo/eval_kl": sums["kl"] / n,
            "ppo/eval_response_length": sums["length"] / n, "ppo/eval_no_eos_fraction": sums["no_eos"] / n}


def check_signal(config: PPOConfig, state: TrainState, rollout: dict[str, float], iteration: int) -> None:
    """Keep the first iterations' rollout metrics in the (checkpointed) state; after the last of them, stop or
    warn when none carried a reward signal (`guards.reward_signal_problem`)."""
    seen = state.extra.setdefault("early_rollouts", [])
    seen.append({k: rollout[k] for k in ("no_eos_fraction", "shaped_score_mean", "shaped_score_std")})
    if iteration + 1 < config.dead_signal_iterations:
        return
    problem = reward_signal_problem(seen, config.missing_eos_score, int(config.max_new_tokens))
    if problem is None:
        return
    message = f"PPO cannot learn: {problem} (set ppo.dead_signal: warn to train anyway)"
    if config.dead_signal == "raise":
        raise DeadSignalError(message)
    warnings.warn(message, stacklevel=2)


def mean_over_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Average per-process metrics (every process holds the same number of rollouts)."""
    summed = all_reduce_sum(accelerator, metrics)
    return {key: value / accelerator.num_processes for key, value in summed.items()}


def _restore_extras(state: TrainState, kl_controller: KLController, moments: RunningMoments) -> None:
    if "kl_controller" in state.extra:
        kl_controller.load_state_dict(state.extra["kl_controller"])
    if "score_moments" in state.extra:
        moments.load_state_dict(state.extra["score_moments"])


@dataclass
class PPOModels:
    """The four models of PPO. Only `actor_critic` is trained."""

    tokenizer: PreTrainedTokenizerBase
    """The SFT model's tokenizer (the reward model must share its vocabulary and chat template)."""
    actor_critic: nn.Module
    """`PolicyWithValueHead` or `PolicyAndCritic`: forward → `(logits, values)`; `.pretrained_model` samples."""
    reference: nn.Module | None
    """Frozen π_ref (the SFT model); None with LoRA: the policy with its adapters disabled."""
    reward_model: nn.Module | None
    """Frozen `AutoModelForSequenceClassification` with one label (None: the reward is `reward_functions` only)."""


def _load_frozen(path: str | Path, reward: bool) -> nn.Module:
    model = load_reward_model(path, dtype=torch.float32) if reward else AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True)
    return freeze(disable_dropout(model))


def load_ppo_models(config: PPOConfig, sft_model_path: str | Path,
                    reward_model_path: str | Path | None) -> PPOModels:
    """Load the tokenizer, the actor-critic to train, the frozen reference and the frozen reward model (all
    float32 on CPU, dropout off; the trainer moves them to its device). Seeds the global RNG (LoRA init)."""
    if config.uses_reward_model and reward_model_path is None:
        raise ValueError("reward_model_weight > 0 needs a reward model path")
    set_seed(config.seed)
    return PPOModels(
        tokenizer=AutoTokenizer.from_pretrained(sft_model_path),
        actor_critic=build_actor_critic(config, sft_model_path, reward_model_path),
        reference=None if config.lora is not None else _load_frozen(sft_model_path, reward=False),
        reward_model=_load_frozen(reward_model_path, reward=True) if config.uses_reward_model else None,
    )


# --------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------


def train_ppo(
    config: PPOConfig,
    sft_model_path: str | Path,
    reward_model_path: str | Path | None,
    prompt_rows: Sequence[dict],
    output_dir: str | Path,
    logger: MetricLogger | None = None,
    eval_prompt_rows: Sequence[dict] | None = None,
    reward_model_eval_accuracy: float | None = None,
    reward_model_eval_pairs: Sequence[dict] | None = None,
) -> TrainResult:
    """Train the SFT policy at `sft_model_path` with PPO against the reward model at `reward_model_path` on
    `{"prompt"}` rows; resumes from the newest checkpoint in `output_dir`. See `run_ppo`."""
    models = load_ppo_models(config, sft_model_path, reward_model_path)
    return run_ppo(config, models, prompt_rows, output_dir, logger, eval_prompt_rows, reward_model_eval_accuracy,
                   reward_model_eval_pairs)


def run_ppo(
    config: PPOConfig,
    models: PPOModels,
    prompt_rows: Sequence[dict],
    output_dir: str | Path,
    logger: MetricLogger | None = None,
    eval_prompt_rows: Sequence[dict] | None = None,
    reward_model_eval_accuracy: float | None = None,
    reward_model_eval_pairs: Sequence[dict] | None = None,
) -> TrainResult:
    """PPO on loaded `models` (see `load_ppo_models`); resumes from the newest checkpoint in `output_dir`.

    The RM is checked first (docs/pitfalls.md §2): `reward_model_eval_accuracy`, else its accuracy on
    `reward_model_eval_pairs` (`{"prompt", "chosen", "rejected"}`), must reach `min_reward_model_accuracy`.
    Metrics per iteration (`ppo/`): score_mean, kl, kl_coef, entropy, clip_fraction, approx_kl, policy_loss,
    value_loss, value_clip_fraction, explained_variance, response_length, no_eos_fraction, distinct_2,
    reward_mean, tokens_per_sec, episodes_per_sec, peak_memory_mb (+ score_std, shaped_score_mean, value_mean,
    return_mean, ratio_mean, loss, grad_norm, learning_rate, critic_warmup, shaped_score_std,
    no_eos_penalized_fraction; seconds of the iteration split into time_generation_s, time_scoring_s (critic,
    reference and reward forwards) and time_update_s); `ppo/eval_*` on `eval_prompt_rows`.
    `kl` is the mean over responses of Σ_t KL_t (the penalty's estimator); `tokens_per_sec` counts sampled
    response tokens per second of the whole iteration (rollout and update). Returns the final policy in
    `output_dir/model` (loads with `AutoModelForCausalLM.from_pretrained`).
    """
    output_dir = Path(output_dir)
    config = resolve_from_rows(config, models.tokenizer, prompt_rows)
    accelerator = make_accelerator(config)
    device = accelerator.device
    if config.rollout_batch_size % (config.batch_size * config.grad_accum_steps * accelerator.num_processes):
        raise ValueError("rollout_batch_size must be a multiple of batch_size × grad_accum_steps × num_processes")
    tokenizer, reference = models.tokenizer, models.reference
    reward_model = models.reward_model.to(device) if models.reward_model is not None else None
    rm_accuracy = check_reward_model(reward_model, tokenizer, reward_model_eval_accuracy, reward_model_eval_pairs,
                                     config.min_reward_model_accuracy, config.weak_reward_model,
                                     config.max_prompt_len) if reward_model is not None else None
    scorer = build_scorer(reward_model, config.reward_model_weight, config.reward_functions)
    if reference is not None:
        reference.to(device)
    kl_controller, moments = make_kl_controller(config), RunningMoments()
    own_rates = [(critic_parameters(models.actor_critic), config.value_learning_rate or 20 * config.learning_rate)]
    session = start_session(config, accelerator, models.actor_critic.to(device), output_dir, logger,
                            own_rates=own_rates)
    state = session.state
    _restore_extras(state, kl_controller, moments)
    if rm_accuracy is not None:
        session.log({"ppo/rm_eval_accuracy": rm_accuracy})

    prompts = [row["prompt"] for row in prompt_rows]
    eval_prompts = [row["prompt"] for row in eval_prompt_rows or []]
    sampler = EpochPermutationSampler(len(prompts), config.seed)
    xcfg, rank = config.experience_config(), accelerator.process_index
    bar = progress_bar(config.max_steps, state.step, "ppo", config.progress_bar and accelerator.is_main_process)
    last: dict[str, float] = {}
    while state.step < config.max_steps:
        iteration, started, timings = state.step, time.perf_counter(), {}
        kl_coef = kl_controller.value
        # 1. Outer loop: rollout → score → KL-penalised rewards → GAE, with the current policy.
        indices, state.position = sampler.take(state.position, config.rollout_batch_size)
        batch_prompts = [prompts[i] for i in indices[rank :: accelerator.num_processes]]
        experience = make_experience(session.unwrapped, session.unwrapped.pretrained_model, reference,
                                     scorer, tokenizer, batch_prompts, xcfg, kl_coef, moments,
                                     seed=iteration_seed(config.seed, iteration, rank, 0), timings=timings)
        rollout = mean_over_processes(accelerator, experience_metrics(experience))
        rollout["no_eos_penalized_fraction"] = rollout["no_eos_fraction"] if config.missing_eos_score is not None \
            else 0.0
        ensure_finite(session, rollout["score_mean"], "reward-model score")
        if iteration < config.dead_signal_iterations:
            check_signal(config, state, rollout, iteration)
        # 2. Inner loop: ppo_epochs × minibatches of clipped updates (the critic alone during warm-up).
        critic_only = iteration < config.value_warmup_iterations
        update_started = time.perf_counter()
        update = ppo_update(session, experience, config, iteration_seed(config.seed, iteration, rank, 1),
                            critic_only)
        timings["update_s"] = time.perf_counter() - update_started
        # 3. Adapt β to the measured KL, advance the learning-rate schedule, count the iteration.
        kl_controller.update(rollout["kl"], n_steps=config.rollout_batch_size)
        learning_rate = session.scheduler.get_last_lr()[0]
        session.scheduler.step()
        state.step += 1
        state.extra.update(kl_controller=kl_controller.state_dict(), score_moments=moments.state_dict())
        # 4. Checkpoint, log, evaluate.
        maybe_checkpoint(session)
        elapsed = time.perf_counter() - started
        tokens = all_reduce_sum(accelerator, {"t": float(experience.response_mask.sum())})["t"]
        metrics = {f"ppo/{k}": v for k, v in {**rollout, **update}.items()}
        metrics.update({
            "ppo/kl_coef": kl_coef, "ppo/learning_rate": learning_rate, "ppo/critic_warmup": float(critic_only),
            "ppo/tokens_per_sec": tokens / elapsed, "ppo/episodes_per_sec": config.rollout_batch_size / elapsed,
            "ppo/peak_memory_mb": peak_memory_mb(device),
            **{f"ppo/time_{k}": v for k, v in timings.items()},
        })
        bar.set_postfix({"score": f"{rollout['score_mean']:.3f}", "kl": f"{rollout['kl']:.3f}"})
        bar.update(1)
        done = state.step == config.max_steps
        if state.step % config.log_every == 0 or done:
            session.log(metrics)
            last = metrics
        if eval_prompts and config.eval_every and state.step % config.eval_every == 0 and not done:
            session.log(evaluate_on_prompts(session, reference, scorer, tokenizer, eval_prompts, config))
    bar.close()
    final_eval = evaluate_on_prompts(session, reference, scorer, tokenizer, eval_prompts, config) \
        if eval_prompts else {}
    if final_eval:
        session.log(final_eval)
    # HF causal-LM layout (LoRA merged into a copy) + the value head file or the critic + the tokenizer.
    model_dir = save_final_model(accelerator, session.model, tokenizer, output_dir)
    return TrainResult(model_dir=model_dir, metrics={**last, **final_eval},
                       resumed_from_step=session.resumed_from_step)
