"""Prefect task: GRPO or RLOO (stage named by the algorithm, section `grpo`) of the SFT policy against the trained
reward model and/or reward functions, with no critic."""

from __future__ import annotations

from dataclasses import replace

from rlhf_core.trainers.grpo import train_grpo
from tasks.pointers import StagePointer
from tasks.policy_stage import run_policy_stage
from tasks.runner import StageEnv, stage_task

# Curves: every metric about reward, score, KL, clipping or length (the trainer's names, whatever their exact set).
CURVE_WORDS = ("reward", "score", "kl", "clip_fraction", "response_length", "no_eos")


@stage_task("grpo")
def grpo_task(
    env: StageEnv, validated: StagePointer, sft: StagePointer, reward_model: StagePointer | None = None
) -> StagePointer:
    """Train the GRPO/RLOO policy (init and reference: SFT; reward: the RM and/or `grpo.reward_functions`);
    returns the policy pointer. The stage is `grpo` or `rloo`, after the pipeline's `algorithm`."""
    stage = env.config.algorithm
    if stage not in ("grpo", "rloo"):
        raise ValueError(f"grpo task run with algorithm {stage!r}")
    return run_policy_stage(
        env,
        stage,
        "grpo",
        replace(env.config.grpo, algorithm=stage),
        train_grpo,
        CURVE_WORDS,
        validated,
        sft,
        reward_model,
    )
