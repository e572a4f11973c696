"""The RLHF pipeline as one Prefect flow, built from the config:

    python -m flows.pipeline configs/quickstart.yaml [dpo.dpo_beta=0.2 ...]     (or: rlhf run CONFIG)

    validate ─► sft ─┬─► [collect] ─► reward_model ─► ppo | grpo | rloo ─┐
                     │                                                     ├─► evaluate ─► register
                     └─► dpo ─────────────────────────────────────────────┘    (rlhf-policy@candidate, @champion)

Every stage is a Prefect task that reuses its cached result or (resumes and) trains (`tasks/runner.py`), and
records one MLflow child run under this flow run's parent run (`docs/lineage.md`). DPO needs no reward model; it
is trained anyway when evaluation scores with it (`evaluation.reward_model`, the default). GRPO and RLOO (section
`grpo`) need it only when `grpo.reward_model_weight > 0`; with reward functions alone they train without one. With `collect` in
`stages`, the SFT (or base) model's responses to the training prompts are ranked by a judge or by people
(docs/collection.md) and the reward model trains on those rankings instead of `datasets.preferences`.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_table_artifact
from pydantic import BaseModel

from flows.config import PipelineConfig, dump_config, load_config
from rlhf_core.evaluation import results_table
from tasks import parent_runs, tracking
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

RLHF_UI_DEFAULT = "http://127.0.0.1:5000"  # `rlhf ui`'s address: a local store nothing serves yet opens there
CANDIDATE, CHAMPION = "candidate", "champion"
CLI_PRINTS_RESULTS = "RLHF_CLI_PRINTS_RESULTS"


class RegisteredPolicy(BaseModel):
    """Where the final policy went in the model registry."""

    name: str
    version: str
    aliases: list[str]
    promoted: bool
    metric: str | None = None
    value: float | None = None
    champion_value: float | None = None


class PipelineResult(BaseModel):
    """What `rlhf_pipeline` returns: pointers only, plus where to look."""

    name: str
    config_hash: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    mlflow_run_url: str
    flow_run_id: str | None
    stages: dict[str, StagePointer]
    registered: RegisteredPolicy | None = None

    def results_table(self) -> str | None:
        """The evaluate stage's comparison as a plain-text table (None without an evaluate stage)."""
        evaluation = self.stages.get("evaluate")
        if evaluation is None or "per_model" not in evaluation.extra:
            return None
        return results_table(evaluation.extra["per_model"], evaluation.extra.get("baseline"))

    def executed(self) -> list[str]:
        """Stages trained (or validated) now, not taken from the cache."""
        return [s for s, p in self.stages.items() if not p.reused]


# --------------------------------------------------------------------------------------------------------------
# Parent run
# --------------------------------------------------------------------------------------------------------------


def mlflow_run_url(config: PipelineConfig, experiment_id: str, run_id: str) -> str:
    """The run's page on the MLflow server in use (the tracking server, or `$RLHF_MLFLOW_UI_URL` serving the
    local store: `tracking.ui_url`), else where `rlhf ui` will show it."""
    uri = config.tracking_uri()
    return (
        tracking.run_url(uri, experiment_id, run_id) or f"{RLHF_UI_DEFAULT}/#/experiments/{experiment_id}/runs/{run_id}"
    )


def _flow_run() -> tuple[str | None, str | None]:
    from prefect.runtime import flow_run

    url = getattr(flow_run, "ui_url", None)
    # Without a configured UI URL Prefect returns "None/flow-runs/...": no link then.
    return flow_run.get_id(), url if url and url.startswith(("http://", "https://")) else None


# The training stages whose step budget is a parent-run param (next to each algorithm's key setting).
TRAINING_STAGES = ("sft", "reward_model", "dpo", "ppo", "grpo", "rloo")
KEY_SETTINGS = {
    "dpo": ("dpo_beta",),
    "ppo": ("kl_coef",),
    "grpo": ("num_samples_per_prompt", "kl_coef"),
    "rloo": ("num_samples_per_prompt", "kl_coef"),
}
SECTION = {"rloo": "grpo"}  # the config section of a stage named otherwise


def pipeline_run_name(config: PipelineConfig, now: datetime | None = None) -> str:
    """`<pipeline>-<algorithm>-<UTC YYYYmmdd-HHMMSS>`: runs of one pipeline stay apart in the runs table."""
    now = now or datetime.now(UTC)
    return f"{config.name}-{config.algorithm}-{now.astimezone(UTC):%Y%m%d-%H%M%S}"


def key_params(config: PipelineConfig) -> dict[str, str]:
    """The parent run's params: what tells two pipelines apart at a glance in the runs table (the full config
    is the `pipeline_config.yaml` artifact and every stage run's params)."""
    active = config.active_stages()
    params = {
        "algorithm": config.algorithm,
        "base_model": config.base_model,
        "seed": str(config.seed),
        "stages": ",".join(active),
    }
    for stage in TRAINING_STAGES:
        if stage not in active:
            continue
        section = getattr(config, SECTION.get(stage, stage))
        for field in ("max_steps", *KEY_SETTINGS.get(stage, ())):
            params[f"{stage}.{field}"] = str(getattr(section, field))
    return params


def log_headline_metrics(env: StageEnv, evaluation: StagePointer | None) -> None:
    """The evaluated policy's `eval/*` metrics on the parent run too: the runs table then compares pipelines
    (gold and RM scores, win rates, KL, lengths) without opening their evaluate runs."""
    if evaluation is not None and evaluation.metrics:
        tracking.MLflowLogger(env.client, env.parent_run_id).log_metrics(dict(evaluation.metrics), step=0)


def start_pipeline_run(config: PipelineConfig, flow_name: str = "pipeline") -> StageEnv:
    """Set up MLflow (experiment with its artifact location) and open the parent run of this flow run."""
    client = tracking.tracking_client(config.tracking_uri())
    experiment_id = tracking.ensure_experiment(client, config.tracking.experiment_name, config.artifact_location())
    flow_run_id, flow_run_url = _flow_run()
    parent_runs.close_dead_runs(client, experiment_id, config.name, config.work_path())
    run = client.create_run(
        experiment_id,
        run_name=pipeline_run_name(config),
        tags={
            k: v
            for k, v in {
                "rlhf.kind": "pipeline",
                "rlhf.pipeline": config.name,
                "rlhf.flow": flow_name,
                "rlhf.algorithm": config.algorithm,
                "rlhf.config_hash": config.config_hash(),
                "rlhf.code_version": config.cache.code_version or tracking.code_version(),
                "rlhf.git_commit": tracking.git_commit(),
                "prefect.flow_run_id": flow_run_id,
                "prefect.flow_run_url": flow_run_url,
            }.items()
            if v is not None
        },
    )
    run_id = run.info.run_id
    parent_runs.hold(config.work_path(), run_id)
    tracking.log_text(client, run_id, dump_config(config), "pipeline_config.yaml")
    tracking.log_params(client, run_id, key_params(config))
    if flow_run_id is not None:  # Prefect artifacts belong to a flow run
        create_link_artifact(
            link=mlflow_run_url(config, experiment_id, run_id),
            link_text=f"MLflow run {run_id}",
            key="mlflow-run",
            description=f"MLflow parent run of pipeline {config.name!r}",
        )
    return StageEnv(config=config, parent_run_id=run_id, experiment_id=experiment_id)


def stage_table_artifact(pointers: dict[str, StagePointer]) -> None:
    """A Prefect table artifact: one row per stage pointer."""
    rows = [
        {
            "stage": stage,
            "status": "reused" if p.reused else "executed",
            "mlflow_run_id": p.run_id or "",
            "model_uri": p.model_uri or "",
            "cache_key": p.cache_key[:16],
            "resumed_from_step": p.resumed_from_step if p.resumed_from_step is not None else "",
        }
        for stage, p in pointers.items()
    ]
    create_table_artifact(table=rows, key="stage-pointers", description="Stage pointers of this pipeline run")


# --------------------------------------------------------------------------------------------------------------
# The DAG
# --------------------------------------------------------------------------------------------------------------


def _opts(config: PipelineConfig, stage: str) -> dict[str, Any]:
    return config.prefect.for_stage(stage)


def run_dag(env: StageEnv) -> dict[str, StagePointer]:
    """Run the config's active stages in order; returns every stage's pointer (plus `base`)."""
    cfg = env.config
    active = cfg.active_stages()
    base = resolve_base_model(cfg)
    out: dict[str, StagePointer] = {"validate": validate_task.with_options(**_opts(cfg, "validate"))(env, base)}
    if "sft" not in active:
        return out
    out["base"] = base
    sft = out["sft"] = sft_task.with_options(**_opts(cfg, "sft"))(env, out["validate"], base)
    collected = None
    if "collect" in active:
        sampler = sft if cfg.collect.model == "sft" else base
        collected = out["collect"] = collect_task.with_options(**_opts(cfg, "collect"))(env, out["validate"], sampler)
    rm = None
    if "reward_model" in active:
        rm = out["reward_model"] = reward_model_task.with_options(**_opts(cfg, "reward_model"))(
            env, out["validate"], sft, collected
        )
    policy = None
    if "dpo" in active:
        policy = out["dpo"] = dpo_task.with_options(**_opts(cfg, "dpo"))(env, out["validate"], sft)
    if "ppo" in active:
        policy = out["ppo"] = ppo_task.with_options(**_opts(cfg, "ppo"))(env, out["validate"], sft, rm)
    for critic_free in ("grpo", "rloo"):
        if critic_free in active:
            policy = out[critic_free] = grpo_task.with_options(name=critic_free, **_opts(cfg, critic_free))(
                env, out["validate"], sft, rm
            )
    if "evaluate" in active:
        available = {"base": base, "sft": sft, "policy": policy}
        models = {name: available[name] for name in cfg.evaluation.models if available.get(name) is not None}
        champion = current_champion(env, policy, sft)
        if champion is not None and "policy" in models:
            models[CHAMPION] = champion  # scored beside the candidate, on the same prompts and seeds
        out["evaluate"] = evaluate_task.with_options(**_opts(cfg, "evaluate"))(
            env, out["validate"], models, reference=sft, reward_model=rm
        )
    return out


def current_champion(env: StageEnv, policy: StagePointer | None, reference: StagePointer) -> StagePointer | None:
    """The registered `@champion` as a model to evaluate, unless it is this pipeline's own policy, absent, or of
    another vocabulary than `reference` (then promotion falls back to the champion's stored score)."""
    if policy is None:
        return None
    found = tracking.champion_model(env.client, env.config.tracking.registered_model, env.config.work_path() / "models")
    if found is None or found[0].run_id == policy.run_id:
        return None
    version, model_dir = found
    from transformers import AutoTokenizer

    if (
        AutoTokenizer.from_pretrained(model_dir).get_vocab()
        != AutoTokenizer.from_pretrained(reference.model_dir).get_vocab()
    ):
        print(f"@champion (version {version.version}) has another vocabulary: compared by its stored score")
        return None
    return StagePointer(
        stage=CHAMPION,
        cache_key=f"{version.name}/{version.version}:{version.run_id}",
        run_id=version.run_id,
        model_uri=f"models:/{version.name}/{version.version}",
        model_dir=model_dir,
    )


def champion_metric(metrics: dict[str, float]) -> str | None:
    """`eval/gold_score` when the task has a gold judge, else `eval/rm_score` (docs/lineage.md)."""
    return next((m for m in ("eval/gold_score", "eval/rm_score") if m in metrics), None)


def register_policy(env: StageEnv, policy: StagePointer, evaluation: StagePointer | None) -> RegisteredPolicy:
    """Register the policy run's model (once per run), point `candidate` at it, and move `champion` to it only
    when its evaluation metric beats the current champion's (or there is no champion yet)."""
    client, name = env.client, env.config.tracking.registered_model
    metrics = evaluation.metrics if evaluation is not None else {}
    metric = env.config.tracking.promotion_metric or champion_metric(metrics)
    value = metrics.get(metric) if metric else None
    # The champion scored in this same evaluation, on the same prompts; else (no champion evaluated) its stored
    # value from its own evaluation.
    rescored = evaluation.extra.get("per_model", {}).get(CHAMPION, {}) if evaluation is not None else {}
    tags = {
        "rlhf.pipeline": env.config.name,
        "rlhf.stage": policy.stage,
        "rlhf.cache_key": policy.cache_key,
        "rlhf.evaluate_run_id": evaluation.run_id if evaluation else None,
    }
    if metric is not None:
        tags[metric] = value
    version = tracking.register_version(client, name, policy.run_id or "", tags)
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion = tracking.alias_version(client, name, CHAMPION)
    champion_value = None
    if champion is not None and metric is not None and str(champion.version) != version:
        if metric in rescored:
            champion_value = float(rescored[metric])
        elif metric in (champion.tags or {}):
            champion_value = float(champion.tags[metric])
    promoted = False
    if value is not None and (champion is None or champion_value is None or value > champion_value):
        client.set_registered_model_alias(name, CHAMPION, version)
        promoted = champion is None or str(champion.version) != version
    aliases = list(client.get_model_version(name, version).aliases or [])
    tracking.set_tags(
        client,
        env.parent_run_id,
        {"rlhf.registered_model": f"{name}/{version}", "rlhf.promoted": str(promoted).lower()},
    )
    return RegisteredPolicy(
        name=name,
        version=version,
        aliases=sorted(aliases),
        promoted=promoted,
        metric=metric,
        value=value,
        champion_value=champion_value,
    )


def finish_pipeline(env: StageEnv, pointers: dict[str, StagePointer], status: str) -> None:
    """Close the parent run and attach the stage-pointer table to the flow run."""
    tracking.end_run(env.client, env.parent_run_id, status)
    parent_runs.release(env.config.work_path(), env.parent_run_id)
    if _flow_run()[0] is not None:
        stage_table_artifact({s: p for s, p in pointers.items() if s != "base"})


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(config_path: str, overrides: list[str] | None = None) -> PipelineResult:
    """Run the pipeline of `config_path` (with `a.b=value` overrides): every active stage, cached and resumable."""
    config = load_config(config_path, overrides)
    env = start_pipeline_run(config)
    pointers: dict[str, StagePointer] = {}
    try:
        pointers = run_dag(env)
        log_headline_metrics(env, pointers.get("evaluate"))
        policy = pointers.get(config.algorithm)
        registered = None
        if policy is not None and policy.model_uri is not None:  # nothing to register without a logged model
            registered = register_policy(env, policy, pointers.get("evaluate"))
    except BaseException as exc:
        finish_pipeline(env, pointers, tracking.status_for(exc))
        raise
    finish_pipeline(env, pointers, "FINISHED")
    result = PipelineResult(
        name=config.name,
        config_hash=config.config_hash(),
        tracking_uri=config.tracking_uri(),
        experiment_id=env.experiment_id,
        parent_run_id=env.parent_run_id,
        mlflow_run_url=mlflow_run_url(config, env.experiment_id, env.parent_run_id),
        flow_run_id=_flow_run()[0],
        stages={s: p for s, p in pointers.items() if s != "base"},
        registered=registered,
    )
    print(
        f"pipeline {config.name!r} done: executed {result.executed() or 'nothing (all cached)'}; "
        f"MLflow: {result.mlflow_run_url}"
    )
    table = result.results_table()
    if table and not os.environ.get(CLI_PRINTS_RESULTS):  # `rlhf run` prints it itself, once, after the run
        print(f"evaluation on {config.evaluation.num_prompts or 'all'} held-out prompts:\n{table}")
    return result


if __name__ == "__main__":
    rlhf_pipeline(sys.argv[1], sys.argv[2:])
