"""Prefect task: validate every configured dataset, split held-out rows, store them canonically, record digests.

The validation itself always runs (it is what computes the digests every downstream cache key depends on); its
MLflow run is reused when the digests and settings are unchanged. Invalid data stops the pipeline here, before any
training: the report is written under `<work_dir>/reports/`, attached to the flow run as a Prefect markdown
artifact and logged to a FAILED MLflow `validate` run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.artifacts import create_markdown_artifact
from transformers import AutoTokenizer

from rlhf_core.atomic import atomic_open, sha256_file
from rlhf_core.lengths import LengthStats, measure_lengths
from schemas import DataValidationError, canonical_json, content_digest, load_rows, train_eval_split
from tasks import tracking
from tasks.lengths import LENGTHS_KEY
from tasks.pointers import DataRef, StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage, stage_task

if TYPE_CHECKING:
    from schemas.config import DatasetSource

# config key → (row kind, names of the stored parts: (train, eval) for split datasets, (whole,) otherwise)
LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    "demonstrations": ("demonstration", ("sft_train", "sft_eval")),
    "preferences": ("preference", ("preference_train", "preference_eval")),
    "prompts_train": ("prompt", ("prompts_train",)),
    "prompts_eval": ("prompt", ("prompts_eval",)),
}


class DataValidationFailed(RuntimeError):
    """Some dataset failed validation; `report_path` is the markdown report, `markdown` its text."""

    def __init__(self, message: str, report_path: Path, markdown: str) -> None:
        super().__init__(message)
        self.report_path = report_path
        self.markdown = markdown


def store_rows(work_dir: Path, name: str, kind: str, rows: list[dict], source: str) -> DataRef:
    """Write `rows` as canonical JSON lines to `<work_dir>/data/<name>-<digest>.jsonl` (content-addressed,
    atomic), so the file's sha256 is the rows' digest. A file already there is reused only when its sha256
    still matches; otherwise (edited, truncated, an older format) it is written again."""
    digest = content_digest(rows)
    hex_digest = digest.rpartition(":")[2]
    path = work_dir / "data" / f"{name}-{hex_digest[:16]}.jsonl"
    if not (path.is_file() and sha256_file(path) == hex_digest):
        with atomic_open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(canonical_json(row) + "\n")
    return DataRef(name=name, kind=kind, digest=digest, path=str(path), source=source, num_rows=len(rows))


def _load(source: DatasetSource, kind: str) -> list[dict]:
    loaded = load_rows(source.path, kind, format=source.format, split=source.split)
    rows = list(loaded.rows)
    return rows[: source.limit] if source.limit is not None else rows


def _report_markdown(failures: dict[str, DataValidationError]) -> str:
    parts = ["# Data validation failed", ""]
    for key, exc in failures.items():
        report = exc.report
        body = report.to_markdown() if hasattr(report, "to_markdown") else str(report)
        parts += [f"## datasets.{key}", "", body, ""]
    return "\n".join(parts)


def _fail(env: StageEnv, failures: dict[str, DataValidationError]) -> None:
    """Write and attach the report everywhere a user looks, then stop the flow."""
    markdown = _report_markdown(failures)
    report_dir = env.config.work_path() / "reports"
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"validation-{time.strftime('%Y%m%d-%H%M%S')}-{env.parent_run_id[:8]}.md"
    path.write_text(markdown)
    create_markdown_artifact(
        markdown=markdown, key="validation-report", description=f"Data validation failed: {', '.join(failures)}"
    )
    client = env.client
    run = client.create_run(
        env.experiment_id,
        run_name="validate",
        tags={
            "rlhf.kind": "stage",
            "rlhf.stage": "validate",
            "mlflow.parentRunId": env.parent_run_id,
            "rlhf.pipeline": env.config.name,
            "rlhf.validation": "failed",
        },
    )
    tracking.log_text(client, run.info.run_id, markdown, "validation_report.md")
    tracking.end_run(client, run.info.run_id, "FAILED")
    tracking.set_tags(
        client, env.parent_run_id, {"rlhf.failed_stage": "validate", "rlhf.stage_run.validate": run.info.run_id}
    )
    raise DataValidationFailed(f"data validation failed for {', '.join(failures)}; report: {path}", path, markdown)


def _summary(refs: dict[str, DataRef]) -> str:
    lines = [
        "# Data validation passed",
        "",
        "| dataset | kind | rows | digest | source |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.name} | {r.kind} | {r.num_rows} | `{r.digest}` | {r.source} |" for r in refs.values()]
    return "\n".join(lines) + "\n"


def validate_datasets(env: StageEnv) -> dict[str, DataRef]:
    """Load and validate every configured dataset, split and store them; raises `DataValidationFailed`."""
    cfg, work_dir = env.config, env.config.work_path()
    refs: dict[str, DataRef] = {}
    failures: dict[str, DataValidationError] = {}
    for key, (kind, names) in LAYOUT.items():
        source = getattr(cfg.datasets, key)
        if source is None:
            continue
        kind = getattr(source, "kind", kind)
        try:
            rows = _load(source, kind)
        except DataValidationError as exc:
            failures[key] = exc
            continue
        if len(names) == 2 and cfg.datasets.eval_fraction > 0:
            parts: tuple[list[dict], ...] = train_eval_split(rows, cfg.datasets.eval_fraction, seed=cfg.seed)
        else:
            parts = (rows,)
        for name, part in zip(names, parts, strict=False):
            refs[name] = store_rows(work_dir, name, kind, list(part), source.path)
    if failures:
        _fail(env, failures)
    return refs


def measure_datasets(refs: dict[str, DataRef], tokenizer_dir: str) -> dict[str, dict[str, LengthStats]]:
    """Token lengths of every stored dataset, with the base model's tokenizer, as the trainers encode them."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {name: measure_lengths(tokenizer, read_rows(ref), ref.kind) for name, ref in refs.items()}


def _lengths_table(lengths: dict[str, dict[str, LengthStats]]) -> str:
    lines = [
        "",
        "## Token lengths (base model's tokenizer, chat template and end-of-turn included)",
        "",
        "| dataset | field | rows | p50 | p95 | max |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, fields in lengths.items():
        for field, stats in fields.items():
            s = stats.summary()
            lines.append(f"| {name} | {field} | {s['count']} | {s['p50']} | {s['p95']} | {s['max']} |")
    return "\n".join(lines) + "\n"


@stage_task("validate")
def validate_task(env: StageEnv, base: StagePointer) -> StagePointer:
    """Validate the data and measure its token lengths with the `base` model's tokenizer; returns a pointer whose
    `datasets` every training stage reads and whose `extra["lengths"]` resolves their `auto` length limits."""
    refs = validate_datasets(env)
    settings: dict[str, Any] = {"datasets": env.config.datasets.model_dump(mode="json"), "seed": env.config.seed}

    def execute(run: StageRun) -> StageOutcome:
        lengths = measure_datasets(refs, str(base.model_dir))
        tracking.log_text(run.client, run.run_id, _summary(refs) + _lengths_table(lengths), "validation_report.md")
        metrics = {
            f"lengths/{name}/{field}_{k}": float(v)
            for name, fields in lengths.items()
            for field, stats in fields.items()
            for k, v in stats.summary().items()
            if k != "count"
        }
        run.logger.log_metrics(metrics, step=0)
        return StageOutcome(
            datasets=refs,
            metrics=metrics,
            extra={
                "num_rows": {n: r.num_rows for n, r in refs.items()},
                LENGTHS_KEY: {n: {f: s.to_json() for f, s in fields.items()} for n, fields in lengths.items()},
            },
        )

    return run_stage(env, "validate", stage_config=settings, data=refs, upstream={"base": base}, execute=execute)
