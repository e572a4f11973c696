"""Each stage as its own Prefect flow, given the pointers of its upstream stages (e.g. from an earlier pipeline's
`PipelineResult.stages`, or `pointer.json` in a stage directory):

    dpo_flow("configs/quickstart.yaml", upstream={"sft": sft_pointer_dict}, overrides=["dpo.dpo_beta=0.3"])

The data is always (re)validated first — cheap, and it is what yields the digests every cache key needs; its
MLflow run is reused when unchanged. A stage flow records its own parent run (`rlhf.flow = stage:<name>`), and
the same cache applies: a stage whose key already finished is reused, not retrained.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import load_config
from flows.pipeline import finish_pipeline, start_pipeline_run
from tasks import tracking
from tasks.base_model import resolve_base_model
from tasks.collect import collect_task
from tasks.dpo import dpo_task
from tasks.evaluate import evaluate_task
from tasks.grpo import grpo_task
from tasks.pointers import StagePointer
from tasks.ppo import ppo_task
from tasks.reward_model import reward_model_task
from tasks.runner import StageEnv
from tasks.sft import sft_task
from tasks.validate import validate_task

# Upstream pointers each stage needs (validate is run by the stage flow itself).
NEEDS: dict[str, tuple[str, ...]] = {
    "validate": (),
    "sft": (),
    "collect": ("policy",),
    "reward_model": ("sft",),
    "dpo": ("sft",),
    "ppo": ("sft",),  # + "reward_model" when ppo.reward_model_weight > 0
    "grpo": ("sft",),  # + "reward_model" when grpo.reward_model_weight > 0; algorithm: grpo
    "rloo": ("sft",),  # the same, algorithm: rloo
    "evaluate": ("sft", "policy"),
}


def _run(env: StageEnv, stage: str, validated: StagePointer, up: dict[str, StagePointer]) -> StagePointer:
    opts = env.config.prefect.for_stage(stage)
    if stage == "sft":
        return sft_task.with_options(**opts)(env, validated, resolve_base_model(env.config))
    if stage == "collect":
        return collect_task.with_options(**opts)(env, validated, up["policy"])
    if stage == "reward_model":  # on the rankings of `upstream["collect"]` when given
        return reward_model_task.with_options(**opts)(env, validated, up["sft"], up.get("collect"))
    if stage == "dpo":
        return dpo_task.with_options(**opts)(env, validated, up["sft"])
    if stage == "ppo":
        return ppo_task.with_options(**opts)(env, validated, up["sft"], up.get("reward_model"))
    if stage in ("grpo", "rloo"):
        if env.config.algorithm != stage:
            raise ValueError(f"stage {stage!r} needs algorithm: {stage} (it is {env.config.algorithm!r})")
        return grpo_task.with_options(name=stage, **opts)(env, validated, up["sft"], up.get("reward_model"))
    models = {"sft": up["sft"], "policy": up["policy"]}
    if "base" in env.config.evaluation.models:
        models = {"base": resolve_base_model(env.config), **models}
    return evaluate_task.with_options(**opts)(
        env, validated, models, reference=up["sft"], reward_model=up.get("reward_model")
    )


def run_single_stage(
    stage: str, config_path: str, upstream: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> StagePointer:
    """Validate the data, then run `stage` alone with the given upstream pointers (dicts or `StagePointer`s)."""
    if stage not in NEEDS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(NEEDS)}")
    config = load_config(config_path, overrides)
    up = {role: StagePointer.model_validate(p) for role, p in (upstream or {}).items()}
    missing = [role for role in NEEDS[stage] if role not in up]
    if missing:
        raise ValueError(f"stage {stage!r} needs upstream pointer(s) {missing}")
    env = start_pipeline_run(config, flow_name=f"stage:{stage}")
    pointers: dict[str, StagePointer] = {}
    try:
        pointers["validate"] = validate_task.with_options(**config.prefect.for_stage("validate"))(
            env, resolve_base_model(config)
        )
        if stage != "validate":
            pointers[stage] = _run(env, stage, pointers["validate"], up)
    except BaseException as exc:
        finish_pipeline(env, pointers, tracking.status_for(exc))
        raise
    finish_pipeline(env, pointers, "FINISHED")
    return pointers[stage]


@flow(name="rlhf-validate")
def validate_flow(config_path: str, overrides: list[str] | None = None) -> StagePointer:
    """Validate the config's datasets and record their digests."""
    return run_single_stage("validate", config_path, None, overrides)


@flow(name="rlhf-sft")
def sft_flow(config_path: str, overrides: list[str] | None = None) -> StagePointer:
    """SFT from the config's base model."""
    return run_single_stage("sft", config_path, None, overrides)


@flow(name="rlhf-collect")
def collect_flow(config_path: str, upstream: dict[str, Any], overrides: list[str] | None = None) -> StagePointer:
    """Rankings of `upstream["policy"]`'s responses to the training prompts (judge or human labeler)."""
    return run_single_stage("collect", config_path, upstream, overrides)


@flow(name="rlhf-reward-model")
def reward_model_flow(config_path: str, upstream: dict[str, Any], overrides: list[str] | None = None) -> StagePointer:
    """The reward model from `upstream["sft"]` (on `upstream["collect"]`'s rankings when given)."""
    return run_single_stage("reward_model", config_path, upstream, overrides)


@flow(name="rlhf-dpo")
def dpo_flow(config_path: str, upstream: dict[str, Any], overrides: list[str] | None = None) -> StagePointer:
    """DPO from `upstream["sft"]`."""
    return run_single_stage("dpo", config_path, upstream, overrides)


@flow(name="rlhf-ppo")
def ppo_flow(config_path: str, upstream: dict[str, Any], overrides: list[str] | None = None) -> StagePointer:
    """PPO from `upstream["sft"]` against `upstream["reward_model"]`."""
    return run_single_stage("ppo", config_path, upstream, overrides)


@flow(name="rlhf-grpo")
def grpo_flow(config_path: str, upstream: dict[str, Any], overrides: list[str] | None = None) -> StagePointer:
    """GRPO or RLOO (after the config's `algorithm`) from `upstream["sft"]` (and `upstream["reward_model"]`)."""
    config = load_config(config_path, overrides)
    stage = config.algorithm if config.algorithm in ("grpo", "rloo") else "grpo"
    return run_single_stage(stage, config_path, upstream, overrides)


@flow(name="rlhf-evaluate")
def evaluate_flow(config_path: str, upstream: dict[str, Any], overrides: list[str] | None = None) -> StagePointer:
    """Evaluate `upstream["policy"]` against `upstream["sft"]` (RM scores with `upstream["reward_model"]`)."""
    return run_single_stage("evaluate", config_path, upstream, overrides)
