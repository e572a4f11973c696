"""PPO for RLHF: the actor-critic of the teaching guide, trained against a reward (a frozen reward model and/or
reward functions) with a KL penalty to a frozen reference (the SFT model). One iteration, `ppo_iteration`, in
the order of the PPO paper's Algorithm 1:

    # 1. experience, with the current policy π_old (rlhf_core.experience.make_experience)
    prompts  ← next rollout_batch_size prompts
    y ~ π_old(·|x)  with log π_old(a_t|s_t);   V_old(s_t);   log π_ref(a_t|s_t);   score = shape(RM(x, y))
    R_t = −β·KL_t + 1[t = last]·score;   A_t, returns_t = GAE(R, V_old);   Â = whiten(A)
    # 2. learning: ppo_epochs passes over the experience in shuffled minibatches
    for epoch in range(ppo_epochs):
        for minibatch in shuffle(experience):
            loss = −L_clip(ρ, Â) + c1·L_vf(V, returns) − c2·S        (losses.ppo_total_loss)
            step AdamW (gradient clipped)
    # 3. β ← KL controller(KL measured in the rollout); the learning-rate schedule advances one step

Models (`rlhf_core/trainers/ppo_models.py`). The actor-critic is one module whose forward returns
`(logits, values)`: `critic="shared"` (default) is `PolicyWithValueHead`, one body with an LM head and a scalar
value head; `critic="separate"` is `PolicyAndCritic`, the policy plus a critic initialised from the reward
model. The reward model and the reference are frozen; with LoRA the reference is the policy with adapters
disabled. Dropout is off in every model (docs/pitfalls.md §6).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rlhf_core.callbacks import MetricLogger
from rlhf_core.experience import (
    Experience,
    ExperienceConfig,
    KLEstimator,
    RunningMoments,
    ScoreNorm,
    experience_metrics,
    make_experience,
)
from rlhf_core.guards import check_reward_model
from rlhf_core.kl_control import KLController, make_kl_controller
from rlhf_core.lengths import resolve_from_rows, unresolved
from rlhf_core.logprobs import response_forward
from rlhf_core.losses import entropy_from_logits, ppo_policy_loss, ppo_total_loss, value_loss, whiten
from rlhf_core.rewards import RewardScorer, build_scorer
from rlhf_core.trainers.config import TrainResult
from rlhf_core.trainers.data_order import EpochPermutationSampler
from rlhf_core.trainers.loop import StepOutcome, train_loop
from rlhf_core.trainers.on_policy import (
    OnPolicyConfig,
    apply_gradients,
    check_signal,
    evaluate_on_prompts,
    iteration_seed,
    mean_over_processes,
)
from rlhf_core.trainers.ppo_models import PPOModels, critic_parameters, load_ppo_models
from rlhf_core.trainers.session import (
    Session,
    all_reduce_sum,
    backward_normalized,
    ensure_finite,
    peak_memory_mb,
    start_session,
)
from rlhf_core.trainers.setup import make_accelerator
from rlhf_core.trainers.state import save_final_model

CriticKind = Literal["shared", "separate"]


@dataclass(frozen=True)
class PPOConfig(OnPolicyConfig):
    """PPO hyper-parameters (plus the shared `OnPolicyConfig` and `TrainerConfig` fields; `max_steps` counts PPO
    iterations)."""

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
    score_norm: ScoreNorm = "none"
    """Running normalisation of RM scores: "none", "std" (s/σ) or "mean_std" ((s − μ)/σ)."""
    score_clip: float | None = None
    """Clip the normalised score to ±this (None: no clipping)."""
    critic: CriticKind = "shared"
    """"shared": value head on the policy body; "separate": a critic initialised from the reward model."""
    value_learning_rate: float | None = None
    """Peak learning rate of the critic-only parameters (the value head, or the separate critic); None: 20 × the
    policy's `learning_rate`. A fresh value head starts from nothing while the policy should barely move: at the
    policy's rate it cannot follow the returns within a run (docs/pitfalls.md §11)."""
    value_warmup_iterations: int = 2
    """First iterations that update only the critic (value head, or the separate critic); the policy waits."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not unresolved(self):
            self.experience_config()  # validates the rollout fields
        minibatch = self.batch_size * self.grad_accum_steps
        if self.rollout_batch_size <= 0 or self.rollout_batch_size % minibatch:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a positive multiple of "
                f"batch_size × grad_accum_steps ({minibatch})"
            )
        if self.ppo_epochs <= 0 or not self.clip_eps > 0 or self.vf_coef < 0 or self.ent_coef < 0:
            raise ValueError("need ppo_epochs > 0, clip_eps > 0, vf_coef >= 0 and ent_coef >= 0")
        if self.value_clip_range is not None and not self.value_clip_range > 0:
            raise ValueError(f"value_clip_range must be > 0 or None, got {self.value_clip_range}")
        if self.kl_coef < 0 or (self.target_kl is not None and (self.target_kl <= 0 or self.kl_coef <= 0)):
            raise ValueError("need kl_coef >= 0, and target_kl > 0 with kl_coef > 0 for adaptive control")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"critic must be 'shared' or 'separate', got {self.critic!r}")
        if self.value_warmup_iterations < 0:
            raise ValueError(f"value_warmup_iterations must be >= 0, got {self.value_warmup_iterations}")
        if self.reward_model_weight == 0 and self.critic == "separate":
            raise ValueError(
                "critic='separate' starts the critic from the reward model: it needs reward_model_weight > 0"
            )
        if self.value_learning_rate is not None and not self.value_learning_rate > 0:
            raise ValueError(f"value_learning_rate must be > 0 or None, got {self.value_learning_rate}")

    def experience_config(self) -> ExperienceConfig:
        if unresolved(self):
            raise ValueError(
                f"PPO lengths {unresolved(self)} are 'auto': resolve them from the data first "
                "(rlhf_core.lengths.resolve_lengths; the pipeline does) or set integers"
            )
        return ExperienceConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            max_prompt_len=self.max_prompt_len,
            kl_estimator=self.kl_estimator,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            missing_eos_score=self.missing_eos_score,
            score_norm=self.score_norm,
            score_clip=self.score_clip,
            old_logprobs=self.old_logprobs_source,
        )


# --------------------------------------------------------------------------------------------------------------
# One iteration
# --------------------------------------------------------------------------------------------------------------


def ppo_losses(
    model: nn.Module, minibatch: Experience, config: PPOConfig, critic_only: bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of one micro-batch (a token mean) and its detached diagnostics.

    `loss = policy_loss + vf_coef·value_loss − ent_coef·entropy`; during the value warm-up (`critic_only`)
    `loss = vf_coef·value_loss`. Every diagnostic is computed either way, so metric names never change.
    """
    mb, mask = minibatch, minibatch.response_mask
    out = response_forward(model, mb.prompt_ids, mb.prompt_attention_mask, mb.response_ids, mask, config.temperature)
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


@dataclass
class PPORun:
    """What stays fixed over a PPO run, and the two pieces of state besides the weights (both checkpointed)."""

    session: Session
    models: PPOModels
    scorer: RewardScorer
    kl_controller: KLController
    moments: RunningMoments


def ppo_iteration(run: PPORun, prompts: Sequence, iteration: int) -> tuple[dict[str, float], dict[str, float]]:
    """One PPO iteration on this process's `prompts` (see the module docstring). Returns the rollout's
    diagnostics (averaged over processes) and the updates' (averaged over all updates), un-prefixed."""
    session, config = run.session, run.session.config
    rank, timings = session.accelerator.process_index, {}
    kl_coef = run.kl_controller.value
    # 1. Experience: sample, critic values, reference log-probs, scores, KL-penalised rewards, GAE. Under the
    # same autocast as the updates, so with bf16 π_old is the distribution the first update sees (ratio 1).
    with session.accelerator.autocast():
        experience = make_experience(
            session.unwrapped,
            session.unwrapped.pretrained_model,
            run.models.reference,
            run.scorer,
            run.models.tokenizer,
            prompts,
            config.experience_config(),
            kl_coef,
            run.moments,
            seed=iteration_seed(config.seed, iteration, rank, 0),
            timings=timings,
        )
    rollout = mean_over_processes(session.accelerator, experience_metrics(experience))
    rollout["no_eos_penalized_fraction"] = rollout["no_eos_fraction"] if config.missing_eos_score is not None else 0.0
    ensure_finite(session, rollout["score_mean"], "reward-model score")
    if iteration < config.dead_signal_iterations:
        check_signal(config, session.state, rollout, iteration, "ppo")
    if config.whiten_advantages:  # once over the whole rollout, not per minibatch (docs/pitfalls.md §10)
        experience.advantages = whiten(experience.advantages, experience.response_mask)

    # 2. Learning: ppo_epochs passes over the experience in shuffled minibatches (the critic alone in warm-up).
    update_started = time.perf_counter()
    critic_only = iteration < config.value_warmup_iterations
    rows_per_update = config.batch_size * config.grad_accum_steps
    shuffle = torch.Generator().manual_seed(iteration_seed(config.seed, iteration, rank, 1))
    session.model.train()  # dropout is disabled in every config, so train mode changes no number
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(config.ppo_epochs):
        for indices in torch.randperm(len(experience), generator=shuffle).split(rows_per_update):
            for key, value in minibatch_update(session, experience, indices, config, critic_only).items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    update = {key: value / updates for key, value in totals.items()}

    # 3. Adapt β to the measured KL; advance the learning-rate schedule and the iteration count.
    run.kl_controller.update(rollout["kl"], n_steps=config.rollout_batch_size)
    update["learning_rate"] = session.scheduler.get_last_lr()[0]
    session.scheduler.step()
    session.state.step += 1
    session.state.extra.update(kl_controller=run.kl_controller.state_dict(), score_moments=run.moments.state_dict())
    timings["update_s"] = time.perf_counter() - update_started
    update.update(
        kl_coef=kl_coef,
        critic_warmup=float(critic_only),
        tokens=float(experience.response_mask.sum()),
        **{f"time_{k}": v for k, v in timings.items()},
    )
    return rollout, update


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
    return run_ppo(
        config,
        models,
        prompt_rows,
        output_dir,
        logger,
        eval_prompt_rows,
        reward_model_eval_accuracy,
        reward_model_eval_pairs,
    )


def _restore_extras(run: PPORun) -> None:
    extra = run.session.state.extra
    if "kl_controller" in extra:
        run.kl_controller.load_state_dict(extra["kl_controller"])
    if "score_moments" in extra:
        run.moments.load_state_dict(extra["score_moments"])


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
    reward_model = models.reward_model.to(device) if models.reward_model is not None else None
    rm_accuracy = (
        check_reward_model(
            reward_model,
            models.tokenizer,
            reward_model_eval_accuracy,
            reward_model_eval_pairs,
            config.min_reward_model_accuracy,
            config.weak_reward_model,
            config.max_prompt_len,
        )
        if reward_model is not None
        else None
    )
    if models.reference is not None:
        models.reference.to(device)
    own_rates = [(critic_parameters(models.actor_critic), config.value_learning_rate or 20 * config.learning_rate)]
    session = start_session(
        config, accelerator, models.actor_critic.to(device), output_dir, logger, own_rates=own_rates
    )
    run = PPORun(
        session,
        models,
        build_scorer(reward_model, config.reward_model_weight, config.reward_functions),
        make_kl_controller(config.kl_coef, config.target_kl, config.kl_horizon),
        RunningMoments(),
    )
    _restore_extras(run)
    if rm_accuracy is not None:
        session.log({"ppo/rm_eval_accuracy": rm_accuracy})

    prompts = [row["prompt"] for row in prompt_rows]
    eval_prompts = [row["prompt"] for row in eval_prompt_rows or []]
    sampler = EpochPermutationSampler(len(prompts), config.seed)

    def step(log_now: bool) -> StepOutcome:
        started = time.perf_counter()
        indices, session.state.position = sampler.take(session.state.position, config.rollout_batch_size)
        batch_prompts = [prompts[i] for i in indices[accelerator.process_index :: accelerator.num_processes]]
        rollout, update = ppo_iteration(run, batch_prompts, session.state.step)
        elapsed = time.perf_counter() - started
        tokens = all_reduce_sum(accelerator, {"t": update.pop("tokens")})["t"]
        metrics = {f"ppo/{k}": v for k, v in {**rollout, **update}.items()}
        metrics.update(
            {
                "ppo/tokens_per_sec": tokens / elapsed,
                "ppo/episodes_per_sec": config.rollout_batch_size / elapsed,
                "ppo/peak_memory_mb": peak_memory_mb(device),
            }
        )
        return StepOutcome(metrics, {"score": f"{rollout['score_mean']:.3f}", "kl": f"{rollout['kl']:.3f}"})

    def evaluate() -> dict[str, float]:
        if not eval_prompts:
            return {}
        with accelerator.autocast():
            return evaluate_on_prompts(
                accelerator,
                session.unwrapped.pretrained_model,
                models.reference,
                run.scorer,
                models.tokenizer,
                eval_prompts,
                config.experience_config(),
                config.seed,
                config.eval_batch_size or config.batch_size,
                "ppo",
            )

    metrics = train_loop(session, "ppo", step, evaluate)
    # HF causal-LM layout (LoRA merged into a copy) + the value head file or the critic + the tokenizer.
    model_dir = save_final_model(accelerator, session.model, models.tokenizer, output_dir)
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from_step=session.resumed_from_step)
