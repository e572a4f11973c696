"""Prefect task: GRPO or RLOO (stage named by the algorithm, section `grpo`) of the SFT policy against the trained
reward model and/or reward functions, with no critic."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from rlhf_core.trainers.grpo import train_grpo
from tasks.caching import module_source_digest
from tasks.lengths import measured, resolve_stage_lengths, sampling_lengths
from tasks.pointers import StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage, stage_task

DATA = ("prompts_train", "prompts_eval")
# Curves: every metric about reward, score, KL, clipping or length (the trainer's names, whatever their exact set).
CURVE_WORDS = ("reward", "score", "kl", "clip_fraction", "response_length", "no_eos")


@stage_task("grpo")
def grpo_task(env: StageEnv, validated: StagePointer, sft: StagePointer,
              reward_model: StagePointer | None = None) -> StagePointer:
    """Train the GRPO/RLOO policy (init and reference: SFT; reward: the RM and/or `grpo.reward_functions`);
    returns the policy pointer. The stage is `grpo` or `rloo`, after the pipeline's `algorithm`."""
    stage = env.config.algorithm
    if stage not in ("grpo", "rloo"):
        raise ValueError(f"grpo task run with algorithm {stage!r}")
    data = {name: validated.datasets[name] for name in DATA if name in validated.datasets}
    config = resolve_stage_lengths(replace(env.config.grpo, algorithm=stage), env.config.lengths, "grpo",
                                   measured(validated, ("prompts_train",), "prompt"), sampling_lengths(validated))
    if config.uses_reward_model and reward_model is None:
        raise ValueError(f"{stage}: grpo.reward_model_weight > 0 needs the reward_model stage")
    rm = reward_model if config.uses_reward_model else None
    # A reward function's source enters the cache key: editing it retrains the policy.
    stage_config: dict[str, Any] = {**asdict(config), "reward_function_digests": {
        spec: module_source_digest(spec) for spec in config.reward_functions}}

    def execute(run: StageRun) -> StageOutcome:
        eval_rows = read_rows(data["prompts_eval"]) if "prompts_eval" in data else None
        # The RM stage's held-out accuracy gates training (no policy optimisation on an RM at chance).
        result = train_grpo(config, sft.model_dir, rm.model_dir if rm is not None else None,
                            read_rows(data["prompts_train"]), run.output_dir, run.logger, eval_prompt_rows=eval_rows,
                            reward_model_eval_accuracy=rm.metrics.get("rm/eval_accuracy") if rm is not None else None)
        curves = tuple(sorted(n for n in run.logger.history if any(w in n for w in CURVE_WORDS)))
        return StageOutcome(model_dir=result.model_dir, metrics=result.metrics,
                            resumed_from_step=result.resumed_from_step, curves=curves)

    upstream = {"sft": sft, **({"reward_model": rm} if rm is not None else {})}
    return run_stage(env, stage, stage_config=stage_config, data=data, upstream=upstream,
                     lineage={"validate": validated, "reference": sft}, execute=execute)
