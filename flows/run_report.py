"""What `rlhf run` shows besides the trainers' progress: a line per stage start and end, and where to look after.

The stage lines come from the stage tasks' Prefect state hooks (`tasks.runner.stage_listener`); the where-to-look
block from the flow's result, or from MLflow when the flow failed before returning one.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.model_store import mlflow_client


class StageProgress:
    """A line when a stage starts and one when it ends, from the stage tasks' Prefect state hooks
    (`tasks.runner.stage_listener`):

        [2/5] ▶ sft started
        [2/5] ✔ sft completed in 41.2 s            (or: ✔ sft reused from the cache in 0.3 s; ✘ sft failed …)

    A retried stage shows its attempt number. The time is the attempt's own, from its Running state to its end.
    """

    def __init__(self, out: Console, stages: list[str]) -> None:
        self.out = out
        self.stages = stages
        self.finished: list[str] = []
        self.started_at: dict[str, float] = {}

    def _position(self) -> str:
        return f"[dim][{len(self.finished) + 1}/{len(self.stages)}][/]"

    def __call__(self, stage: str, state: Any, attempt: int) -> None:
        now = time.monotonic()
        if state.is_running():
            self.started_at[stage] = now
            again = f" (attempt {attempt})" if attempt > 1 else ""
            self.out.print(f"{self._position()} [cyan]▶[/] {escape(stage)} started{again}")
            return
        from tasks.runner import CACHED

        ok = state.is_completed()
        mark = "[green]✔[/]" if ok else "[red]✘[/]"
        what = "reused from the cache" if state.name == CACHED else state.name.lower()
        took = now - self.started_at.get(stage, now)
        self.out.print(f"{self._position()} {mark} {escape(stage)} {what} in {took:.1f} s")
        self.finished.append(stage)


def find_pipeline_run(tracking_uri: str, flow_run_id: str) -> Any | None:
    """The MLflow parent run tagged with this Prefect flow run (docs/lineage.md), or None."""
    client = mlflow_client(tracking_uri)
    experiments = client.search_experiments()
    if not experiments:
        return None
    runs = client.search_runs(
        [e.experiment_id for e in experiments],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`rlhf.kind` = 'pipeline'",
        max_results=1,
    )
    return runs[0] if runs else None


def stage_rows(table: Table, result: Any | None, parent: Any | None) -> None:
    """One row per stage run: from the flow's result, else from the parent run's `rlhf.stage_run.*` tags."""
    if result is not None:
        stages = {stage: (p.run_id or "", p.reused) for stage, p in result.stages.items()}
    elif parent is not None:
        tags = parent.data.tags
        stages = {
            k.removeprefix("rlhf.stage_run."): (v, f"rlhf.reused.{k.removeprefix('rlhf.stage_run.')}" in tags)
            for k, v in tags.items()
            if k.startswith("rlhf.stage_run.")
        }
    else:
        return
    for stage, (run_id, reused) in stages.items():
        table.add_row(f"  {stage}", run_id + (" [blue](reused from cache)[/]" if reused else ""))


def where_to_look(cfg: Any, flow_run_id: str, result: Any | None, default_tracking_uri: str) -> Table:
    """The Prefect flow run, the MLflow parent run and its stage runs, and the commands that open them."""
    from prefect.utilities.urls import url_for

    from tasks.tracking import run_url

    tracking_uri = cfg.tracking_uri()
    store_flag = "" if tracking_uri == default_tracking_uri else f" --tracking-uri {tracking_uri}"
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("[bold]Prefect flow run[/]", flow_run_id)
    flow_url = url_for("flow-run", obj_id=flow_run_id)
    table.add_row("", flow_url or "(temporary server: `prefect server start`, then open it under Runs)")
    table.add_row("[bold]MLflow store[/]", tracking_uri)
    parent = None if result is not None else find_pipeline_run(tracking_uri, flow_run_id)
    if result is not None or parent is not None:
        run_id = result.parent_run_id if result is not None else parent.info.run_id
        experiment_id = result.experiment_id if result is not None else parent.info.experiment_id
        table.add_row("[bold]MLflow pipeline run[/]", f"{run_id} (experiment {experiment_id})")
        url = run_url(tracking_uri, experiment_id, run_id)
        page = f"#/experiments/{experiment_id}/runs/{run_id}"
        table.add_row("", url or f"rlhf ui{store_flag}, then http://127.0.0.1:5000/{page}")
    stage_rows(table, result, parent)
    registered = getattr(result, "registered", None)
    model = cfg.tracking.registered_model
    if registered is not None:
        promoted = " [green]promoted to @champion[/]" if registered.promoted else ""
        table.add_row(
            "[bold]Registered[/]",
            f"{registered.name} v{registered.version} @{', @'.join(registered.aliases)}{promoted}",
        )
    table.add_row("[bold]Lineage[/]", f"rlhf lineage models:/{model}@candidate{store_flag}")
    table.add_row("[bold]Try it[/]", f"rlhf chat models:/{model}@candidate{store_flag}")
    return table
