"""Prefect task: PPO of the SFT policy against the trained reward model and/or reward functions."""

from __future__ import annotations

from rlhf_core.trainers.ppo import train_ppo
from tasks.pointers import StagePointer
from tasks.policy_stage import run_policy_stage
from tasks.runner import StageEnv, stage_task

# Curves: every PPO metric about reward, score or KL (the trainer's names, whatever their exact set).
CURVE_WORDS = ("reward", "score", "kl", "explained_variance")


@stage_task("ppo")
def ppo_task(
    env: StageEnv, validated: StagePointer, sft: StagePointer, reward_model: StagePointer | None = None
) -> StagePointer:
    """Train the PPO policy (init and reference: SFT; reward: the RM and/or `ppo.reward_functions`); returns the
    policy pointer."""
    return run_policy_stage(env, "ppo", "ppo", env.config.ppo, train_ppo, CURVE_WORDS, validated, sft, reward_model)
