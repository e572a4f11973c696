"""Critic-free policy optimisation: GRPO and RLOO, one trainer (they differ only in the advantage estimator).

    for iteration in range(max_steps):
        prompts ← next prompts_per_iteration prompts
        y_1..y_K ~ π_old(·|x) for every prompt, with log π_old(a_t|s_t);   log π_ref(a_t|s_t)
        s_i = score(x, y_i)  (RM and/or reward functions; the no-EOS penalty)   [− β·KL_i with kl_in="reward"]
        A_i = rloo(s) or grpo(s) within each prompt's group of K               (rlhf_core.group_advantages)
        for epoch in range(epochs):
            for minibatch in shuffle(rollouts):
                loss = −aggregate(min(ρ·A, clip(ρ, 1±ε)·A) [− β·k3_t with kl_in="loss"])
                step AdamW (gradient clipped)

No value model: the other K − 1 answers to the same prompt are the baseline. `algorithm="rloo"` uses the
leave-one-out mean; `algorithm="grpo"` the group mean, divided by the group's std unless `scale_by_std=False`
(Dr. GRPO). The reference is the SFT model (with LoRA: the policy with adapters disabled); dropout is off.

Batch sizes. Each iteration samples `prompts_per_iteration × num_samples_per_prompt` rollouts over all processes
(a prompt's K samples stay on one process, so every group is complete where its advantages are computed); one
optimizer update consumes `batch_size × grad_accum_steps` rollouts per process. `max_steps`, `checkpoint_every`,
`log_every`, `eval_every` and the learning-rate schedule count iterations.

Resume. As PPO: a checkpoint holds the policy, optimizer, scheduler, RNG and, in `trainer_state.json`, the
iteration and prompt-stream position; sampling and shuffles draw from generators seeded by `(seed, iteration,
process)`, so a resumed run follows the uninterrupted one exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.callbacks import MetricLogger
from rlhf_core.experience import (
    ExperienceConfig,
    distinct_n,
    reference_logprobs,
    response_token_lists,
    select_rows,
    sequence_kl,
    shape_scores,
)
from rlhf_core.generation import GenerationOutput, generate
from rlhf_core.group_advantages import (
    LossAggregation,
    aggregation_units,
    group_policy_loss,
    grpo_advantages,
    kl_penalized_scores,
    rloo_advantages,
)
from rlhf_core.guards import check_reward_model
from rlhf_core.lengths import resolve_from_rows, unresolved
from rlhf_core.logprobs import response_forward
from rlhf_core.models import disable_dropout, load_reward_model
from rlhf_core.rewards import RewardScorer, build_scorer
from rlhf_core.trainers.common import (
    EpochPermutationSampler,
    Session,
    TrainResult,
    all_reduce_sum,
    apply_lora,
    backward_normalized,
    ensure_finite,
    freeze,
    make_accelerator,
    peak_memory_mb,
    save_final_model,
    set_seed,
    start_session,
)
from rlhf_core.trainers.loop import StepOutcome, train_loop
from rlhf_core.trainers.on_policy import (
    OnPolicyConfig,
    apply_gradients,
    check_signal,
    evaluate_on_prompts,
    iteration_seed,
    mean_over_processes,
)

Algorithm = Literal["grpo", "rloo"]


@dataclass(frozen=True)
class GRPOConfig(OnPolicyConfig):
    """GRPO / RLOO hyper-parameters (plus the shared `OnPolicyConfig` and `TrainerConfig` fields; `max_steps` counts
    iterations)."""

    algorithm: Algorithm = "grpo"
    """Advantage estimator: "grpo" (group mean, ÷ group std unless `scale_by_std` is off) or "rloo" (mean of the
    other K − 1 samples)."""
    max_steps: int = 30
    """Iterations (one rollout batch + `epochs` of updates each)."""
    batch_size: int = 8
    """Rollouts per forward/backward pass on one process (the micro-batch)."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    prompts_per_iteration: int = 8
    """Prompts sampled per iteration, over all processes."""
    num_samples_per_prompt: int = 4
    """K: responses sampled per prompt; the group its advantages are relative to (≥ 2)."""
    epochs: int = 1
    """Passes over each rollout batch (1: every update but the first of an iteration is slightly off-policy)."""
    clip_eps: float = 0.2
    """ε of the clipped ratio π/π_old ∈ [1 − ε, 1 + ε]."""
    kl_coef: float = 0.04
    """β: weight of the KL to the reference (0: none)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where β·KL goes: "loss" (per-token k3 term in the loss, as in GRPO) or "reward" (the response's summed k1
    estimate subtracted from its score before the advantages, as in RLOO)."""
    scale_by_std: bool = True
    """GRPO only: divide by the group's std (False: Dr. GRPO's unscaled advantages)."""
    loss_aggregation: LossAggregation = "token"
    """"token": mean over all tokens; "sequence": mean per response, then over responses (the GRPO paper);
    "constant": sum over tokens ÷ (responses × max_new_tokens) (Dr. GRPO). `group_advantages.aggregate`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not unresolved(self):
            self.experience_config()  # validates the rollout fields
        if self.algorithm not in ("grpo", "rloo"):
            raise ValueError(f"algorithm must be 'grpo' or 'rloo', got {self.algorithm!r}")
        if self.num_samples_per_prompt < 2 or self.prompts_per_iteration < 1:
            raise ValueError("need num_samples_per_prompt >= 2 (a group) and prompts_per_iteration >= 1")
        minibatch = self.batch_size * self.grad_accum_steps
        if self.rollouts_per_iteration % minibatch:
            raise ValueError(
                f"prompts_per_iteration × num_samples_per_prompt ({self.rollouts_per_iteration}) must "
                f"be a multiple of batch_size × grad_accum_steps ({minibatch})"
            )
        if self.epochs <= 0 or not self.clip_eps > 0 or self.kl_coef < 0 or self.kl_in not in ("loss", "reward"):
            raise ValueError("need epochs > 0, clip_eps > 0, kl_coef >= 0 and kl_in in ('loss', 'reward')")
        if self.loss_aggregation not in ("token", "sequence", "constant"):
            raise ValueError(
                f"loss_aggregation must be 'token', 'sequence' or 'constant', got {self.loss_aggregation!r}"
            )

    @property
    def rollouts_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.num_samples_per_prompt

    def experience_config(self) -> ExperienceConfig:
        """The sampling and score-shaping settings (only the no-EOS penalty shapes scores here)."""
        if unresolved(self):
            raise ValueError(
                f"{self.algorithm} lengths {unresolved(self)} are 'auto': resolve them from the data "
                "first (rlhf_core.lengths.resolve_lengths; the pipeline does) or set integers"
            )
        return ExperienceConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            max_prompt_len=self.max_prompt_len,
            missing_eos_score=self.missing_eos_score,
            old_logprobs=self.old_logprobs_source,
        )


@dataclass
class GroupRollout:
    """One iteration's rollouts on one process, K consecutive rows per prompt. `[B, P]` prompts (left-padded),
    `[B, T]` responses (right-padded, `response_mask` 1 on real tokens incl. the final EOS), `[B]` advantages."""

    prompt_ids: torch.Tensor
    prompt_attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    """`[B, T]` log π_old(a_t | s_t): the sampler's own, or the policy's full forward pass under mixed precision."""
    ref_logprobs: torch.Tensor
    """`[B, T]` log π_ref(a_t | s_t)."""
    advantages: torch.Tensor
    """`[B]` one advantage per response, for every one of its tokens."""

    def __len__(self) -> int:
        return self.response_ids.shape[0]


def group_advantages(scores: torch.Tensor, config: GRPOConfig) -> torch.Tensor:
    """`[B]` scores of K consecutive samples per prompt → `[B]` advantages."""
    grouped = scores.view(-1, config.num_samples_per_prompt)  # [prompts, K]
    if config.algorithm == "rloo":
        return rloo_advantages(grouped).flatten()
    return grpo_advantages(grouped, scale_by_std=config.scale_by_std).flatten()


def rollout_metrics(
    rollout: GenerationOutput, raw: torch.Tensor, scores: torch.Tensor, kl: torch.Tensor, k: int
) -> dict[str, float]:
    """Diagnostics of one iteration's samples (un-prefixed): the reward over all samples and within groups (a
    group whose scores are all equal teaches nothing), per-response KL, length, no-EOS share, distinct-2."""
    group_std = scores.view(-1, k).std(dim=1)  # [prompts]
    return {
        "score_mean": float(raw.mean()),
        "score_std": float(raw.std()) if raw.numel() > 1 else 0.0,
        "shaped_score_mean": float(scores.mean()),
        "group_score_std": float(group_std.mean()),
        "zero_std_group_fraction": float((group_std <= 1e-6).float().mean()),
        "kl": float(kl.mean()),
        "response_length": float(rollout.response_mask.sum(1).float().mean()),
        "no_eos_fraction": float((~rollout.ended_with_eos.bool()).float().mean()),
        "distinct_2": distinct_n(response_token_lists(rollout), 2),
    }


@torch.no_grad()
def policy_logprobs(actor: nn.Module, rollout: GenerationOutput, temperature: float) -> torch.Tensor:
    """log π(a_t | s_t) `[B, T]` from one full forward pass over the rollout: the updates' own computation, used as
    π_old under bf16/fp16, where the sampler's incremental decoding rounds differently (docs/pitfalls.md §1)."""
    was_training = actor.training
    actor.eval()
    try:
        return response_forward(
            actor,
            rollout.prompt_ids,
            rollout.prompt_attention_mask,
            rollout.response_ids,
            rollout.response_mask,
            temperature,
        ).logprobs
    finally:
        actor.train(was_training)


@torch.no_grad()
def make_group_rollout(
    session: Session,
    reference: nn.Module | None,
    scorer: RewardScorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    config: GRPOConfig,
    seed: int,
    timings: dict[str, float],
) -> tuple[GroupRollout, dict[str, float]]:
    """Sample K responses per prompt, score them, and turn the scores into group-relative advantages."""
    started, xcfg, k = time.perf_counter(), config.experience_config(), config.num_samples_per_prompt
    actor = session.unwrapped
    repeated = [prompt for prompt in prompts for _ in range(k)]  # K consecutive rows per prompt
    rollout = generate(actor, tokenizer, repeated, xcfg.sampling(seed), max_prompt_len=config.max_prompt_len)
    sampled = time.perf_counter()
    mask = rollout.response_mask
    old_logprobs = (
        rollout.logprobs if xcfg.old_logprobs == "sampler" else policy_logprobs(actor, rollout, config.temperature)
    )
    ref = reference_logprobs(actor, reference, rollout, config.temperature)
    raw = scorer(repeated, rollout)
    scores = shape_scores(raw, rollout.ended_with_eos, xcfg)
    if config.kl_in == "reward" and config.kl_coef:
        scores = kl_penalized_scores(scores, old_logprobs, ref, mask, config.kl_coef)
    timings.update(generation_s=sampled - started, scoring_s=time.perf_counter() - sampled)
    kl = sequence_kl(old_logprobs - ref, mask)  # [B] k1 per response
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    batch = GroupRollout(
        rollout.prompt_ids,
        rollout.prompt_attention_mask,
        rollout.response_ids,
        mask,
        torch.where(mask.bool(), old_logprobs, zero),
        torch.where(mask.bool(), ref, zero),
        group_advantages(scores, config),
    )
    return batch, rollout_metrics(rollout, raw, scores, kl, k)


def minibatch_update(
    session: Session, batch: GroupRollout, indices: torch.Tensor, config: GRPOConfig
) -> dict[str, float]:
    """One optimizer update on the rows `indices`: `grad_accum_steps` micro-batches, each loss weighted by its
    share of the minibatch's aggregation units (tokens or responses, all processes), so the split is exact."""
    accelerator = session.accelerator
    micro_batches = [select_rows(batch, chunk) for chunk in indices.split(config.batch_size)]
    level = config.loss_aggregation
    local_units = sum(aggregation_units(mb.response_mask, level) for mb in micro_batches)
    global_units = all_reduce_sum(accelerator, {"n": local_units})["n"]
    ref_in_loss = config.kl_in == "loss" and config.kl_coef > 0
    sums: dict[str, float] = {}
    for mb in micro_batches:
        units = aggregation_units(mb.response_mask, level)
        with accelerator.accumulate(session.model):
            out = response_forward(
                session.model,
                mb.prompt_ids,
                mb.prompt_attention_mask,
                mb.response_ids,
                mb.response_mask,
                config.temperature,
            )
            loss, stats = group_policy_loss(
                out.logprobs,
                mb.old_logprobs,
                mb.advantages,
                mb.response_mask,
                config.clip_eps,
                level,
                mb.ref_logprobs if ref_in_loss else None,
                config.kl_coef,
                int(config.max_new_tokens),
            )
            backward_normalized(session, loss * units, global_units)
        for key, value in {
            "loss": loss.detach(),
            "clip_fraction": stats.clip_frac,
            "approx_kl": stats.approx_kl,
            "ref_kl_per_token": stats.ref_kl,
        }.items():
            sums[key] = sums.get(key, 0.0) + float(value) * units
    metrics = {key: value / max(global_units, 1.0) for key, value in all_reduce_sum(accelerator, sums).items()}
    ensure_finite(session, metrics["loss"], "loss")
    metrics["grad_norm"] = apply_gradients(session)
    return metrics


def policy_update(session: Session, batch: GroupRollout, config: GRPOConfig, seed: int) -> dict[str, float]:
    """`epochs` passes over the rollouts in shuffled minibatches; returns the diagnostics averaged over updates."""
    generator = torch.Generator().manual_seed(seed)
    session.model.train()  # dropout is disabled, so train mode changes no number
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(config.epochs):
        for indices in torch.randperm(len(batch), generator=generator).split(
            config.batch_size * config.grad_accum_steps
        ):
            for key, value in minibatch_update(session, batch, indices, config).items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    return {key: value / updates for key, value in totals.items()}


@dataclass
class GRPOModels:
    """The policy to train (the SFT model, LoRA adapters if configured), its frozen reference (None with LoRA:
    adapters disabled) and the frozen reward model (None: reward functions only), with the SFT tokenizer."""

    tokenizer: PreTrainedTokenizerBase
    policy: nn.Module
    reference: nn.Module | None
    reward_model: nn.Module | None


def load_grpo_models(
    config: GRPOConfig, sft_model_path: str | Path, reward_model_path: str | Path | None
) -> GRPOModels:
    """Load everything float32 on CPU with dropout off. Seeds the global RNG (LoRA init)."""
    if config.uses_reward_model and reward_model_path is None:
        raise ValueError("reward_model_weight > 0 needs a reward model path")
    set_seed(config.seed)

    def causal_lm() -> nn.Module:
        return disable_dropout(
            AutoModelForCausalLM.from_pretrained(sft_model_path, dtype=torch.float32, use_safetensors=True)
        )

    policy = apply_lora(causal_lm(), config.lora) if config.lora is not None else causal_lm()
    return GRPOModels(
        tokenizer=AutoTokenizer.from_pretrained(sft_model_path),
        policy=policy,
        reference=None if config.lora is not None else freeze(causal_lm()),
        reward_model=freeze(disable_dropout(load_reward_model(reward_model_path, dtype=torch.float32)))
        if config.uses_reward_model
        else None,
    )


def train_grpo(
    config: GRPOConfig,
    sft_model_path: str | Path,
    reward_model_path: str | Path | None,
    prompt_rows: Sequence[dict],
    output_dir: str | Path,
    logger: MetricLogger | None = None,
    eval_prompt_rows: Sequence[dict] | None = None,
    reward_model_eval_accuracy: float | None = None,
    reward_model_eval_pairs: Sequence[dict] | None = None,
) -> TrainResult:
    """Train the SFT policy with GRPO or RLOO on `{"prompt"}` rows; resumes from the newest checkpoint in
    `output_dir`. The RM, when used, must pass the accuracy guard first (as in PPO, docs/pitfalls.md §2).

    Metrics per iteration (`<algorithm>/`): score_mean, score_std, shaped_score_mean, group_score_std (mean within-
    group std of the shaped scores), zero_std_group_fraction, kl (mean per-response Σ_t log π_old − log π_ref),
    ref_kl_per_token (k3), clip_fraction, approx_kl, loss, grad_norm, learning_rate, response_length,
    no_eos_fraction, distinct_2, samples_per_sec, tokens_per_sec, peak_memory_mb, time_{generation,scoring,
    update}_s; `<algorithm>/eval_*` on `eval_prompt_rows`. Returns the policy in `output_dir/model`.
    """
    models = load_grpo_models(config, sft_model_path, reward_model_path)
    config = resolve_from_rows(config, models.tokenizer, prompt_rows)
    accelerator = make_accelerator(config)
    device, rank, name = accelerator.device, accelerator.process_index, config.algorithm
    if config.prompts_per_iteration % accelerator.num_processes:
        raise ValueError("prompts_per_iteration must be a multiple of the number of processes")
    tokenizer, reference = models.tokenizer, models.reference
    reward_model = models.reward_model.to(device) if models.reward_model is not None else None
    rm_accuracy = (
        check_reward_model(
            reward_model,
            tokenizer,
            reward_model_eval_accuracy,
            reward_model_eval_pairs,
            config.min_reward_model_accuracy,
            config.weak_reward_model,
            config.max_prompt_len,
        )
        if reward_model is not None
        else None
    )
    scorer = build_scorer(reward_model, config.reward_model_weight, config.reward_functions)
    if reference is not None:
        reference.to(device)
    session = start_session(config, accelerator, models.policy.to(device), output_dir, logger)
    if rm_accuracy is not None:
        session.log({f"{name}/rm_eval_accuracy": rm_accuracy})
    prompts = [row["prompt"] for row in prompt_rows]
    eval_prompts = [row["prompt"] for row in eval_prompt_rows or []]
    sampler = EpochPermutationSampler(len(prompts), config.seed)

    def step(log_now: bool) -> StepOutcome:
        state = session.state
        iteration, started, timings = state.step, time.perf_counter(), {}
        # 1. Sample K responses per prompt, score them, advantages relative to each prompt's group (under the
        #    updates' autocast, so bf16 samples the policy the updates see).
        indices, state.position = sampler.take(state.position, config.prompts_per_iteration)
        batch_prompts = [prompts[i] for i in indices[rank :: accelerator.num_processes]]
        with accelerator.autocast():
            batch, rollout = make_group_rollout(
                session,
                reference,
                scorer,
                tokenizer,
                batch_prompts,
                config,
                iteration_seed(config.seed, iteration, rank, 0),
                timings,
            )
        rollout = mean_over_processes(accelerator, rollout)
        ensure_finite(session, rollout["score_mean"], "reward score")
        if iteration < config.dead_signal_iterations:
            # With group baselines the signal is the spread of scores *within* groups.
            check_signal(
                config,
                state,
                {**rollout, "shaped_score_std": rollout["group_score_std"]},
                iteration,
                name,
                section="grpo",
            )
        # 2. Epochs of clipped updates on the rollouts.
        update_started = time.perf_counter()
        update = policy_update(session, batch, config, iteration_seed(config.seed, iteration, rank, 1))
        # 3. Advance the schedule and count the iteration.
        update["learning_rate"] = session.scheduler.get_last_lr()[0]
        session.scheduler.step()
        state.step += 1
        timings["update_s"] = time.perf_counter() - update_started
        elapsed = time.perf_counter() - started
        tokens = all_reduce_sum(accelerator, {"t": float(batch.response_mask.sum())})["t"]
        metrics = {f"{name}/{k}": v for k, v in {**rollout, **update}.items()}
        metrics.update(
            {
                f"{name}/tokens_per_sec": tokens / elapsed,
                f"{name}/samples_per_sec": config.rollouts_per_iteration / elapsed,
                f"{name}/peak_memory_mb": peak_memory_mb(device),
                **{f"{name}/time_{k}": v for k, v in timings.items()},
            }
        )
        return StepOutcome(metrics, {"score": f"{rollout['score_mean']:.3f}", "kl": f"{rollout['kl']:.3f}"})

    def evaluate() -> dict[str, float]:
        if not eval_prompts:
            return {}
        with accelerator.autocast():
            return evaluate_on_prompts(
                accelerator,
                session.unwrapped,
                reference,
                scorer,
                tokenizer,
                eval_prompts,
                config.experience_config(),
                config.seed,
                config.eval_batch_size or config.batch_size,
                name,
            )

    metrics = train_loop(session, name, step, evaluate)
    model_dir = save_final_model(accelerator, session.model, tokenizer, output_dir)
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from_step=session.resumed_from_step)
