"""Recent pipeline runs of a store, one row each with its headline evaluation: what `rlhf runs` prints.

A pipeline run is an MLflow parent run (`rlhf.kind = pipeline`, docs/lineage.md); its params hold the key settings
and its metrics the evaluated policy's `eval/*` values (logged by `flows.pipeline`). Rows are plain strings, ready
for a terminal table; missing values are "–".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

MISSING = "–"
# (column header, metric, format, shown without --wide) of the headline evaluation.
METRIC_COLUMNS = (
    ("gold", "eval/gold_score", "{:.2f}", True),
    ("gold win", "eval/win_rate_gold", "{:.2f}", True),
    ("RM", "eval/rm_score", "{:.2f}", False),
    ("RM win", "eval/win_rate_rm", "{:.2f}", True),
    ("KL", "eval/kl_to_ref", "{:.2f}", True),
    ("length", "eval/response_length", "{:.1f}", False),
    ("no EOS", "eval/no_eos_fraction", "{:.2f}", True),
)
RUN_COLUMNS = ("run", "status", "algo", "started UTC", "took")
WIDE_COLUMNS = ("registered", "run id")


def columns(wide: bool = False) -> tuple[str, ...]:
    """The table's headers: about 110 characters wide, or every metric plus the registered model and run id."""
    metrics = tuple(header for header, _, _, short in METRIC_COLUMNS if wide or short)
    return RUN_COLUMNS + metrics + (WIDE_COLUMNS if wide else ())


class RunsError(LookupError):
    """The experiment asked for does not exist."""


@dataclass(frozen=True)
class PipelineRunRow:
    """One pipeline run as table cells (in `columns()` order by `cells()`)."""

    name: str
    status: str
    algorithm: str
    started: str
    duration: str
    metrics: tuple[str, ...]
    registered: str
    run_id: str
    experiment: str

    def cells(self, wide: bool = False) -> tuple[str, ...]:
        """The row's cells under `columns(wide)`."""
        metrics = tuple(v for v, (*_, short) in zip(self.metrics, METRIC_COLUMNS, strict=True) if wide or short)
        wide_cells = (self.registered, self.run_id) if wide else ()
        return (self.name, self.status, self.algorithm, self.started, self.duration, *metrics, *wide_cells)


def _duration(run: Run) -> str:
    if not run.info.end_time or not run.info.start_time:
        return MISSING
    seconds = (run.info.end_time - run.info.start_time) / 1000
    return (
        f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"
    )


def to_row(run: Run, experiment: str = "") -> PipelineRunRow:
    """The table row of one pipeline parent run."""
    metrics, tags = run.data.metrics, run.data.tags
    started = datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%m-%d %H:%M")
    registered = tags.get("rlhf.registered_model", MISSING).replace("/", " v")
    if tags.get("rlhf.promoted") == "true":
        registered += " (champion)"
    return PipelineRunRow(
        name=run.info.run_name or tags.get("rlhf.pipeline", MISSING),
        status=run.info.status,
        algorithm=tags.get("rlhf.algorithm") or run.data.params.get("algorithm", MISSING),
        started=started,
        duration=_duration(run),
        metrics=tuple(fmt.format(metrics[m]) if m in metrics else MISSING for _, m, fmt, _ in METRIC_COLUMNS),
        registered=registered,
        run_id=run.info.run_id,
        experiment=experiment,
    )


def recent_pipeline_runs(client: MlflowClient, experiment: str | None = None, limit: int = 20) -> list[PipelineRunRow]:
    """The `limit` most recent pipeline runs (newest first) of experiment `experiment`, else of every active
    experiment. Raises `RunsError` when the named experiment does not exist."""
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise RunsError(f"no experiment {experiment!r} in this store (experiments: {', '.join(names) or 'none'})")
        experiments = [found]
    else:
        experiments = client.search_experiments()
    if not experiments:
        return []
    names = {e.experiment_id: e.name for e in experiments}
    runs = client.search_runs(
        list(names),
        filter_string="tags.`rlhf.kind` = 'pipeline'",
        max_results=limit,
        order_by=["attributes.start_time DESC"],
    )
    return [to_row(run, names[run.info.experiment_id]) for run in runs]
