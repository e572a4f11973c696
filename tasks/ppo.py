"""Prefect task: PPO of the SFT policy against the trained reward model on the validated prompts."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from rlhf_core.trainers.ppo import train_ppo
from tasks.pointers import StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage

DATA = ("prompts_train", "prompts_eval")
# Curves: every PPO metric about reward, score or KL (the trainer's names, whatever their exact set).
CURVE_WORDS = ("reward", "score", "kl")


@task(name="ppo", cache_policy=NO_CACHE, persist_result=False)
def ppo_task(env: StageEnv, validated: StagePointer, sft: StagePointer, reward_model: StagePointer) -> StagePointer:
    """Train the PPO policy (init and reference: SFT; reward: the RM); returns the policy pointer."""
    data = {name: validated.datasets[name] for name in DATA if name in validated.datasets}

    def execute(run: StageRun) -> StageOutcome:
        eval_rows = read_rows(data["prompts_eval"]) if "prompts_eval" in data else None
        # The RM stage's held-out accuracy gates PPO (PITFALLS 2: no PPO on an RM at chance).
        result = train_ppo(env.config.ppo, sft.model_dir, reward_model.model_dir, read_rows(data["prompts_train"]),
                           run.output_dir, run.logger, eval_prompt_rows=eval_rows,
                           reward_model_eval_accuracy=reward_model.metrics.get("rm/eval_accuracy"))
        curves = tuple(sorted(n for n in run.logger.history if any(w in n for w in CURVE_WORDS)))
        return StageOutcome(model_dir=result.model_dir, metrics=result.metrics,
                            resumed_from_step=result.resumed_from_step, curves=curves)

    return run_stage(env, "ppo", stage_config=env.config.ppo, data=data,
                     upstream={"sft": sft, "reward_model": reward_model},
                     lineage={"validate": validated, "reference": sft}, execute=execute)
