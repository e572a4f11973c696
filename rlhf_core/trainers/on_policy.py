"""What the on-policy RL trainers (PPO, GRPO/RLOO) share beyond the training loop: the settings of sampling and
reward (`OnPolicyConfig`), per-iteration seeds, the gradient step of an update whose schedule advances per
iteration, the held-out evaluation of the sampling policy, and the dead-signal check of the first rollouts."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf_core.experience import ExperienceConfig, reference_logprobs, sequence_kl
from rlhf_core.generation import generate
from rlhf_core.guards import DeadSignalError, reward_signal_problem
from rlhf_core.lengths import Auto
from rlhf_core.rewards import RewardScorer
from rlhf_core.trainers.config import TrainerConfig, check_length_limits
from rlhf_core.trainers.session import Session, all_reduce_sum, ensure_finite
from rlhf_core.trainers.state import TrainState


@dataclass(frozen=True)
class OnPolicyConfig(TrainerConfig):
    """Sampling and reward settings of every on-policy trainer (plus the shared `TrainerConfig` fields)."""

    max_new_tokens: int | Auto = 64
    """Longest sampled response ("auto": from the demonstrations' lengths, resolved by the pipeline,
    `rlhf_core.lengths`)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the losses use the same tempered distribution)."""
    max_prompt_len: int | Auto | None = "auto"
    """Keep the last this-many prompt tokens (None: no limit; "auto": cover 95% of the prompts)."""
    missing_eos_score: float | None = -1.0
    """Score that replaces the reward of a response without EOS (None: no penalty)."""
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
        if self.dead_signal not in ("raise", "warn") or self.dead_signal_iterations < 0:
            raise ValueError("need dead_signal in ('raise', 'warn') and dead_signal_iterations >= 0")
        if self.weak_reward_model not in ("raise", "warn"):
            raise ValueError(f"weak_reward_model must be 'raise' or 'warn', got {self.weak_reward_model!r}")
        if self.reward_model_weight < 0:
            raise ValueError(f"reward_model_weight must be >= 0, got {self.reward_model_weight}")
        if any(":" not in spec for spec in self.reward_functions):
            raise ValueError(f"reward_functions keys must be 'module:function', got {list(self.reward_functions)}")
        if self.reward_model_weight == 0 and not self.reward_functions:
            raise ValueError("reward_model_weight is 0 and there are no reward_functions: nothing to optimise")

    @property
    def uses_reward_model(self) -> bool:
        return self.reward_model_weight > 0

    @property
    def old_logprobs_source(self) -> Literal["sampler", "forward"]:
        """In float32 π_old is the sampler's own; under bf16/fp16 the updates' full forward pass (docs/pitfalls.md §1)."""
        return "sampler" if self.mixed_precision == "no" else "forward"


def iteration_seed(seed: int, iteration: int, process_index: int, purpose: int) -> int:
    """A 63-bit seed for one use (`purpose`: 0 sampling, 1 shuffling, 2 evaluation) in one iteration of one
    process: a pure function of its arguments, which is what makes resume exact."""
    state = np.random.SeedSequence([seed, iteration, process_index, purpose]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def apply_gradients(session: Session) -> float:
    """Clip the accumulated gradient, stop on a non-finite norm, step AdamW and clear; returns ‖g‖ before
    clipping. (Unlike `session.optimizer_step` it does not advance the schedule: on-policy trainers step it once
    per iteration, after all of the iteration's updates.)"""
    accelerator, config = session.accelerator, session.config
    params = [p for p in session.model.parameters() if p.requires_grad]
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
    grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
    if accelerator.scaler is None:
        ensure_finite(session, grad_norm, "gradient norm")
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def mean_over_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Average per-process metrics (every process holds the same number of rollouts)."""
    summed = all_reduce_sum(accelerator, metrics)
    return {key: value / accelerator.num_processes for key, value in summed.items()}


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def evaluate_on_prompts(
    accelerator: Accelerator,
    actor: nn.Module,
    reference: nn.Module | None,
    scorer: RewardScorer,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    sampling: ExperienceConfig,
    seed: int,
    batch_size: int,
    prefix: str,
) -> dict[str, float]:
    """Reward score (RM and/or reward functions, before shaping), per-response KL to the reference, length and
    no-EOS share of `actor`'s samples on held-out `prompts`, as `<prefix>/eval_*`. The sampling seed depends only
    on `seed` and the chunk, so every evaluation of a run samples alike and evaluations compare."""
    shard = list(prompts)[accelerator.process_index :: accelerator.num_processes]
    sums = {"score": 0.0, "kl": 0.0, "length": 0.0, "no_eos": 0.0, "count": 0.0}
    for i, chunk in enumerate(_batches(shard, batch_size)):
        rollout = generate(
            actor,
            tokenizer,
            chunk,
            sampling.sampling(iteration_seed(seed, i, accelerator.process_index, 2)),
            max_prompt_len=sampling.max_prompt_len,
        )
        ref = reference_logprobs(actor, reference, rollout, sampling.temperature)
        sums["score"] += float(scorer(chunk, rollout).sum())
        sums["kl"] += float(sequence_kl(rollout.logprobs - ref, rollout.response_mask).sum())
        sums["length"] += float(rollout.response_mask.sum())
        sums["no_eos"] += float((~rollout.ended_with_eos).sum())
        sums["count"] += len(chunk)
    sums = all_reduce_sum(accelerator, sums)
    n = max(sums["count"], 1.0)
    return {
        f"{prefix}/eval_score_mean": sums["score"] / n,
        f"{prefix}/eval_kl": sums["kl"] / n,
        f"{prefix}/eval_response_length": sums["length"] / n,
        f"{prefix}/eval_no_eos_fraction": sums["no_eos"] / n,
    }


def check_signal(
    config: OnPolicyConfig,
    state: TrainState,
    rollout: dict[str, float],
    iteration: int,
    name: str,
    section: str | None = None,
) -> None:
    """Keep the first iterations' rollout metrics in the (checkpointed) state; after the last of them, stop or
    warn when none carried a reward signal (`guards.reward_signal_problem`). `name` is the algorithm, `section`
    its config section (default: `name`)."""
    seen = state.extra.setdefault("early_rollouts", [])
    seen.append({k: rollout[k] for k in ("no_eos_fraction", "shaped_score_mean", "shaped_score_std")})
    if iteration + 1 < config.dead_signal_iterations:
        return
    problem = reward_signal_problem(seen, config.missing_eos_score, int(config.max_new_tokens))
    if problem is None:
        return
    message = f"{name.upper()} cannot learn: {problem} (set {section or name}.dead_signal: warn to train anyway)"
    if config.dead_signal == "raise":
        raise DeadSignalError(message)
    warnings.warn(message, stacklevel=2)
