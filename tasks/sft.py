"""Prefect task: supervised fine-tuning of the base model on the validated demonstrations."""

from __future__ import annotations

from rlhf_core.trainers.sft import train_sft
from tasks.launch import stage_key_config, train_launched
from tasks.lengths import measured, resolve_stage_lengths
from tasks.pointers import StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage, stage_task

DATA = ("sft_train", "sft_eval")


@stage_task("sft")
def sft_task(env: StageEnv, validated: StagePointer, base: StagePointer) -> StagePointer:
    """Train SFT from `base` on `sft_train` (eval loss on `sft_eval`); returns the SFT pointer."""
    data = {name: validated.datasets[name] for name in DATA if name in validated.datasets}
    config = resolve_stage_lengths(
        env.config.sft,
        env.config.lengths,
        "sft",
        measured(validated, DATA, "prompt"),
        measured(validated, DATA, "response"),
    )

    def execute(run: StageRun) -> StageOutcome:
        eval_rows = read_rows(data["sft_eval"]) if "sft_eval" in data else []
        result = train_launched(
            env, "sft", train_sft, config, base.model_dir, read_rows(data["sft_train"]), eval_rows, run
        )
        return StageOutcome(
            model_dir=result.model_dir,
            metrics=result.metrics,
            resumed_from_step=result.resumed_from_step,
            curves=("sft/loss", "sft/eval_loss"),
        )

    key_config = stage_key_config(config, env.config.launch.for_stage("sft"))
    return run_stage(
        env,
        "sft",
        stage_config=key_config,
        data=data,
        upstream={"base": base},
        lineage={"validate": validated},
        execute=execute,
        extra_tags={"rlhf.base_model": env.config.base_model},
    )
