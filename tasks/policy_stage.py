"""What the on-policy stage tasks (PPO, GRPO/RLOO) share: train the SFT policy against the reward model and/or
reward functions on the prompt datasets, and record it through `run_stage`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rlhf_core.trainers.on_policy import OnPolicyConfig
from tasks.caching import module_source_digest
from tasks.lengths import measured, resolve_stage_lengths, sampling_lengths
from tasks.pointers import StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage

DATA = ("prompts_train", "prompts_eval")


def run_policy_stage(
    env: StageEnv,
    stage: str,
    section: str,
    config: OnPolicyConfig,
    train: Callable[..., Any],
    curve_words: tuple[str, ...],
    validated: StagePointer,
    sft: StagePointer,
    reward_model: StagePointer | None,
) -> StagePointer:
    """Resolve `config`'s `auto` lengths from what validate measured, then train with `train` (`train_ppo` or
    `train_grpo`: init and reference the SFT model) as stage `stage` of config section `section`."""
    data = {name: validated.datasets[name] for name in DATA if name in validated.datasets}
    config = resolve_stage_lengths(
        config,
        env.config.lengths,
        section,
        measured(validated, ("prompts_train",), "prompt"),
        sampling_lengths(validated),
    )
    if config.uses_reward_model and reward_model is None:
        raise ValueError(f"{stage}: {section}.reward_model_weight > 0 needs the reward_model stage")
    rm = reward_model if config.uses_reward_model else None
    # A reward function's source enters the cache key: editing it retrains the policy.
    stage_config: dict[str, Any] = {
        **asdict(config),
        "reward_function_digests": {spec: module_source_digest(spec) for spec in config.reward_functions},
    }

    def execute(run: StageRun) -> StageOutcome:
        eval_rows = read_rows(data["prompts_eval"]) if "prompts_eval" in data else None
        # The RM stage's held-out accuracy gates training (no policy optimisation on an RM at chance,
        # docs/pitfalls.md §2).
        result = train(
            config,
            sft.model_dir,
            rm.model_dir if rm is not None else None,
            read_rows(data["prompts_train"]),
            run.output_dir,
            run.logger,
            eval_prompt_rows=eval_rows,
            reward_model_eval_accuracy=rm.metrics.get("rm/eval_accuracy") if rm is not None else None,
        )
        curves = tuple(sorted(n for n in run.logger.history if any(w in n for w in curve_words)))
        return StageOutcome(
            model_dir=result.model_dir,
            metrics=result.metrics,
            resumed_from_step=result.resumed_from_step,
            curves=curves,
        )

    upstream = {"sft": sft, **({"reward_model": rm} if rm is not None else {})}
    return run_stage(
        env,
        stage,
        stage_config=stage_config,
        data=data,
        upstream=upstream,
        lineage={"validate": validated, "reference": sft},
        execute=execute,
    )
