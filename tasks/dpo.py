"""Prefect task: DPO of the SFT model on the validated preference pairs (the SFT model is the reference)."""

from __future__ import annotations

from rlhf_core.trainers.dpo import train_dpo
from tasks.launch import stage_key_config, train_launched
from tasks.lengths import measured, resolve_stage_lengths
from tasks.pointers import DataRef, StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage, stage_task

DATA = ("preference_train", "preference_eval")
CURVES = ("dpo/loss", "dpo/reward_margin", "dpo/reward_accuracy", "dpo/chosen_rewards", "dpo/rejected_rewards")


def preference_pairs(ref: DataRef) -> list[dict]:
    """The rows as `{"prompt", "chosen", "rejected"}` pairs (rankings expanded by `schemas.ranking_to_pairs`)."""
    rows = read_rows(ref)
    if ref.kind != "ranking":
        return rows
    from schemas import ranking_to_pairs

    return list(ranking_to_pairs(rows))


@stage_task("dpo")
def dpo_task(env: StageEnv, validated: StagePointer, sft: StagePointer) -> StagePointer:
    """Train the DPO policy from the SFT model; returns the policy pointer."""
    data = {name: validated.datasets[name] for name in DATA if name in validated.datasets}
    config = resolve_stage_lengths(
        env.config.dpo,
        env.config.lengths,
        "dpo",
        measured(validated, DATA, "prompt"),
        measured(validated, DATA, "response"),
    )

    def execute(run: StageRun) -> StageOutcome:
        eval_rows = preference_pairs(data["preference_eval"]) if "preference_eval" in data else []
        result = train_launched(
            env, "dpo", train_dpo, config, sft.model_dir, preference_pairs(data["preference_train"]), eval_rows, run
        )
        return StageOutcome(
            model_dir=result.model_dir,
            metrics=result.metrics,
            resumed_from_step=result.resumed_from_step,
            curves=CURVES,
        )

    key_config = stage_key_config(config, env.config.launch.for_stage("dpo"))
    return run_stage(
        env,
        "dpo",
        stage_config=key_config,
        data=data,
        upstream={"sft": sft},
        lineage={"validate": validated, "reference": sft},
        execute=execute,
    )
