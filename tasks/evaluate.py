"""Prefect task: compare the trained models on held-out prompts and record the comparison in MLflow.

Layout in MLflow (so the models compare in ONE view): the `evaluate` stage run holds the samples table
(`eval_samples.json`, viewable in the UI's Evaluation/Artifacts tab), the candidate policy's `eval/*` metrics and
the lineage tags; under it, one nested run per evaluated model (`rlhf.kind = eval_model`, `rlhf.eval.model =
base|sft|policy`) logs the SAME metric names, so selecting those runs (search `tags.rlhf.kind = 'eval_model'`)
gives a side-by-side table and charts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from rlhf_core.evaluation import evaluate_models
from rlhf_core.judges import import_callable
from rlhf_core.lengths import resolve_length
from tasks import tracking
from tasks.caching import module_source_digest
from tasks.lengths import measured, resolve_stage_lengths, sampling_lengths
from tasks.pointers import StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage, stage_task

SAMPLES_TABLE = "eval_samples.json"


def _gold_fn(spec: str | None) -> Any:
    """The configured gold judge (`module:function`, imported: it runs that code), or None."""
    return import_callable(spec) if spec else None


def _model_runs(
    env: StageEnv, run: StageRun, models: Mapping[str, StagePointer], metrics: Mapping[str, Mapping[str, float]]
) -> dict[str, str]:
    """One nested run per evaluated model with identical metric names; returns `{model: run_id}`."""
    out = {}
    for name, pointer in models.items():
        child = run.client.create_run(
            env.experiment_id,
            run_name=f"eval-{name}",
            tags={
                "rlhf.kind": "eval_model",
                "rlhf.eval.model": name,
                "mlflow.parentRunId": run.run_id,
                "rlhf.pipeline": env.config.name,
                "rlhf.upstream.model.run_id": pointer.run_id or "",
                "rlhf.upstream.model.model_uri": pointer.model_uri or "",
            },
        )
        run_id = child.info.run_id
        tracking.MLflowLogger(run.client, run_id).log_metrics(dict(metrics.get(name, {})), step=0)
        tracking.end_run(run.client, run_id)
        out[name] = run_id
    return out


@stage_task("evaluate")
def evaluate_task(
    env: StageEnv,
    validated: StagePointer,
    models: dict[str, StagePointer],
    reference: StagePointer,
    reward_model: StagePointer | None = None,
) -> StagePointer:
    """Evaluate `models` (`{"sft": ..., "policy": ..., "base": ...}`) on `prompts_eval`; KL against `reference`.

    Returns a pointer whose `metrics` are the policy's (else the last model's) `eval/*` values and whose
    `extra["model_runs"]` maps each model to its nested run.
    """
    policy = env.config.lengths
    cfg = env.config.evaluation
    cfg = cfg.model_copy(
        update={
            "sampling": resolve_stage_lengths(
                cfg.sampling, policy, "evaluation.sampling", None, sampling_lengths(validated)
            ),
            "max_prompt_len": resolve_length(
                "max_prompt_len",
                cfg.max_prompt_len,
                measured(validated, ("prompts_eval",), "prompt"),
                policy,
                False,
                "evaluation.",
            ),
        }
    )
    data = {"prompts_eval": validated.datasets["prompts_eval"]}
    rm = reward_model if cfg.reward_model else None

    def execute(run: StageRun) -> StageOutcome:
        prompts = read_rows(data["prompts_eval"])[: cfg.num_prompts]
        report = evaluate_models(
            {name: p.model_dir for name, p in models.items()},
            prompts,
            cfg.sampling,
            reward_model_path=rm.model_dir if rm is not None else None,
            reference_model_path=reference.model_dir,
            gold_fn=_gold_fn(cfg.gold_judge),
            baseline=cfg.baseline if cfg.baseline in models else None,
            seed=env.config.seed,
            batch_size=cfg.batch_size,
            max_prompt_len=cfg.max_prompt_len,
        )
        per_model = {name: dict(values) for name, values in report.metrics.items()}
        model_runs = _model_runs(env, run, models, per_model)
        headline = per_model.get("policy") or per_model[list(models)[-1]]
        run.logger.log_metrics(headline, step=0)
        table = pd.DataFrame(
            [
                {k: v if isinstance(v, (str, int, float)) or v is None else tracking.to_json(v) for k, v in row.items()}
                for row in report.samples
            ]
        )
        run.client.log_table(run.run_id, data=table, artifact_file=SAMPLES_TABLE)
        return StageOutcome(
            metrics=headline, extra={"model_runs": model_runs, "per_model": per_model, "baseline": report.baseline}
        )

    upstream: dict[str, StagePointer] = dict(models)
    if rm is not None:
        upstream["reward_model"] = rm
    upstream["reference"] = reference
    # The judge's source enters the key: editing the judge re-scores.
    stage_config = {
        **cfg.model_dump(mode="json"),
        "gold_judge_digest": module_source_digest(cfg.gold_judge) if cfg.gold_judge else None,
    }
    return run_stage(
        env,
        "evaluate",
        stage_config=stage_config,
        data=data,
        upstream=upstream,
        lineage={"validate": validated},
        execute=execute,
    )
