"""Prefect task: the reward model, initialised from the SFT model, trained on the validated comparisons."""

from __future__ import annotations

from transformers import AutoTokenizer

from rlhf_core.lengths import measure_lengths, merge_stats
from rlhf_core.trainers.reward import train_reward_model
from tasks.launch import stage_key_config, train_launched
from tasks.lengths import measured, resolve_stage_lengths
from tasks.pointers import StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage, stage_task

DATA = ("preference_train", "preference_eval")
CURVES = ("rm/loss", "rm/accuracy", "rm/reward_margin", "rm/eval_accuracy")


@stage_task("reward_model")
def reward_model_task(
    env: StageEnv, validated: StagePointer, sft: StagePointer, collected: StagePointer | None = None
) -> StagePointer:
    """Train the RM from the SFT model on preference (or ranking) rows — the validated `datasets.preferences`,
    or the rankings of the `collect` stage when `collected` is given; returns the RM pointer."""
    source = collected if collected is not None else validated
    data = {name: source.datasets[name] for name in DATA if name in source.datasets}
    if "preference_train" not in data:
        raise ValueError("reward_model: no training comparisons (configure datasets.preferences or the collect stage)")
    upstream = {"sft": sft} if collected is None else {"sft": sft, "collect": collected}
    if collected is None:
        prompt, response = measured(validated, DATA, "prompt"), measured(validated, DATA, "response")
    else:  # the collected rankings: measured here, with the SFT model's tokenizer (the base model's)
        tokenizer = AutoTokenizer.from_pretrained(sft.model_dir)
        stats = [measure_lengths(tokenizer, read_rows(ref), ref.kind) for ref in data.values()]
        prompt, response = merge_stats(*(s["prompt"] for s in stats)), merge_stats(*(s["response"] for s in stats))
    config = resolve_stage_lengths(env.config.reward_model, env.config.lengths, "reward_model", prompt, response)

    def execute(run: StageRun) -> StageOutcome:
        eval_rows = read_rows(data["preference_eval"]) if "preference_eval" in data else []
        result = train_launched(
            env,
            "reward_model",
            train_reward_model,
            config,
            sft.model_dir,
            read_rows(data["preference_train"]),
            eval_rows,
            run,
        )
        return StageOutcome(
            model_dir=result.model_dir,
            metrics=result.metrics,
            resumed_from_step=result.resumed_from_step,
            curves=CURVES,
        )

    key_config = stage_key_config(config, env.config.launch.for_stage("reward_model"))
    return run_stage(
        env,
        "reward_model",
        stage_config=key_config,
        data=data,
        upstream=upstream,
        lineage={"validate": validated},
        execute=execute,
    )
