"""The one code path every stage task goes through: key → lock → reuse or (resume and) execute → record.

    pointer = run_stage(env, "dpo", stage_config=cfg.dpo, data={...}, upstream={"sft": sft}, execute=train)

`execute(run)` is the stage's own few lines (load rows, call the `rlhf_core` trainer with `run.output_dir` and
`run.logger`); everything about caching, locking, MLflow runs and tags is here, once. `@stage_task("dpo")` makes
the function that calls `run_stage` a Prefect task.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from tasks import caching, tracking
from tasks.pointers import DataRef, StagePointer

if TYPE_CHECKING:  # the config object is passed in; its type lives in schemas/, below the tasks
    from schemas.config import PipelineConfig

log = logging.getLogger(__name__)
STARTED, REUSED = "started", "reused"
CACHED = "Cached"
"""The Prefect state name of a stage task whose result was reused: the name Prefect gives its own cache hits, so
its UI shows such a task run as Cached, not as one more Completed run."""


def announce(stage: str, event: str, detail: str) -> None:
    """`Stage <stage> <event>: <detail>` on the Prefect task run's log (the Prefect UI shows it), or on this
    module's logger outside a Prefect run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger: Any = get_run_logger()
    except MissingContextError:
        logger = log
    logger.info("Stage %s %s: %s", stage, event, detail)


StageListener = Callable[[str, State, int], None]
"""Told `(stage, state, attempt)` by the stage task's Prefect state hooks: the Running state when an attempt starts,
the final state (Completed, Cached or Failed) when the task run ends. `rlhf run` draws its progress lines from it."""
_stage_listeners: list[StageListener] = []


@contextmanager
def stage_listener(listener: StageListener) -> Iterator[None]:
    """Tell `listener` about every stage task's state changes in this process while the block runs."""
    _stage_listeners.append(listener)
    try:
        yield
    finally:
        _stage_listeners.remove(listener)


def _tell_stage_listeners(prefect_task: Task, task_run: Any, state: State) -> None:
    """The Prefect state hook (on_running, on_completion, on_failure) of every stage task."""
    for listener in tuple(_stage_listeners):
        listener(prefect_task.name, state, max(task_run.run_count, 1))


class StageTask:
    """A stage's Prefect task (`stage_task`): calling it runs the task and returns the stage's pointer, also when
    the task run ended in the `Cached` state. `fn` is the plain function (no Prefect task run)."""

    def __init__(self, prefect_task: Task, fn: Callable[..., StagePointer]) -> None:
        self.task, self.fn = prefect_task, fn

    def with_options(self, **options: Any) -> StageTask:
        return StageTask(self.task.with_options(**options), self.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> StagePointer:
        returned = self.task(*args, **kwargs)
        # Prefect hands back the state a task returned, as is; its result is the pointer.
        return returned.result() if isinstance(returned, State) else returned


def stage_task(name: str) -> Callable[[Callable[..., StagePointer]], StageTask]:
    """Make `fn` (which returns the stage's pointer, from `run_stage`) the Prefect task of stage `name`. A pointer
    reused from the cache ends the task run in the Completed state named `Cached`, an executed one in
    `Completed`, so Prefect's UI tells them apart."""

    def decorate(fn: Callable[..., StagePointer]) -> StageTask:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> StagePointer | State:
            pointer = fn(*args, **kwargs)
            if pointer.reused:  # a task that returns a state ends in that state
                return Completed(data=pointer, name=CACHED, message=f"reused MLflow run {pointer.run_id}")
            return pointer

        # NO_CACHE: caching is ours (tasks/caching.py), keyed on inputs and checked against MLflow.
        hook = [_tell_stage_listeners]
        prefect_task = task(
            name=name, cache_policy=NO_CACHE, persist_result=False, on_running=hook, on_completion=hook, on_failure=hook
        )(run)
        return StageTask(prefect_task, fn)

    return decorate


@dataclass(frozen=True)
class StageEnv:
    """What every stage task needs besides its inputs: the config and where to record."""

    config: PipelineConfig
    parent_run_id: str
    experiment_id: str

    @property
    def client(self) -> MlflowClient:
        return tracking.tracking_client(self.config.tracking_uri())

    def code_version(self) -> str:
        return self.config.cache.code_version or tracking.code_version()


@dataclass
class StageRun:
    """Handed to a stage's `execute`: its MLflow run, trainer output dir and metric logger."""

    client: MlflowClient
    run_id: str
    output_dir: Path
    logger: tracking.MLflowLogger


@dataclass
class StageOutcome:
    """What `execute` reports back."""

    model_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, DataRef] = field(default_factory=dict)
    curves: tuple[str, ...] = ()
    """Metric names to plot (value vs step) as `plots/<stage>_curves.png`."""


def read_rows(ref: DataRef) -> list[dict]:
    """The canonical rows of a validated dataset (JSON lines written by the validate stage)."""
    with open(ref.path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def record_on_parent(env: StageEnv, pointer: StagePointer) -> None:
    """Parent-run tags: the stage run used, and which earlier run was reused."""
    tags = {f"rlhf.stage_run.{pointer.stage}": pointer.run_id}
    if pointer.reused:
        tags[f"rlhf.reused.{pointer.stage}"] = pointer.run_id
    tracking.set_tags(env.client, env.parent_run_id, tags)


def run_stage(
    env: StageEnv,
    stage: str,
    *,
    stage_config: Any,
    data: Mapping[str, DataRef],
    upstream: Mapping[str, StagePointer],
    execute: Callable[[StageRun], StageOutcome],
    lineage: Mapping[str, StagePointer] | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> StagePointer:
    """Reuse the cached result of `stage` or execute it, under the stage directory's lock.

    upstream: pointers whose results the stage consumes (they enter the cache key and the upstream tags).
    lineage: further pointers recorded only as upstream tags (e.g. the validate run that produced the data,
        whose key covers datasets this stage does not read).
    The cache key covers `stage_config`, the digests of `data`, the upstream cache keys and the code version.
    Returns the stage's pointer (`reused=True` when taken from the cache).
    """
    digests = {name: ref.digest for name, ref in data.items()}
    key = caching.cache_key(stage, stage_config, digests, upstream, env.code_version())
    directory = caching.stage_dir(env.config.work_path(), stage, key)
    client = env.client
    with caching.stage_lock(directory):
        cached = caching.read_pointer(directory)
        if cached is not None:
            reason = caching.stale_reason(cached, client)
            if reason is None and env.config.cache.enabled:
                pointer = cached.model_copy(update={"reused": True, "resumed_from_step": None})
                announce(stage, REUSED, f"MLflow run {cached.run_id} (cache key {key[:12]})")
                record_on_parent(env, pointer)
                return pointer
            log.warning("stage %s: not reusing %s (%s); rerunning", stage, cached.run_id, reason or "cache disabled")
            caching.clear_stage(directory)
        tagged = {**(lineage or {}), **upstream}
        announce(stage, STARTED, f"cache key {key[:12]}")
        pointer = _execute(env, client, stage, key, directory, stage_config, data, tagged, execute, extra_tags or {})
        caching.write_pointer(directory, pointer)
        caching.write_active_run(directory, None)
    record_on_parent(env, pointer)
    return pointer


def _start_stage_run(
    env: StageEnv,
    client: MlflowClient,
    stage: str,
    key: str,
    directory: Path,
    upstream: Mapping[str, StagePointer],
    extra_tags: Mapping[str, str],
) -> str:
    tags: dict[str, Any] = {
        "rlhf.kind": "stage",
        "rlhf.stage": stage,
        "mlflow.parentRunId": env.parent_run_id,
        "rlhf.pipeline": env.config.name,
        "rlhf.cache_key": key,
        "rlhf.code_version": env.code_version(),
        "rlhf.git_commit": tracking.git_commit(),
        "rlhf.stage_dir": str(directory),
        **extra_tags,
    }
    for role, pointer in upstream.items():
        tags[f"rlhf.upstream.{role}.run_id"] = pointer.run_id
        tags[f"rlhf.upstream.{role}.model_uri"] = pointer.model_uri
    # An execution whose process died (SIGKILL) left its run RUNNING; close it and say who took over.
    previous = caching.read_active_run(directory)
    if previous and tracking.mark_killed_if_running(client, previous):
        tags["rlhf.resumes_run"] = previous
    run = client.create_run(
        env.experiment_id, run_name=stage, tags={k: str(v) for k, v in tags.items() if v is not None}
    )
    caching.write_active_run(directory, run.info.run_id)
    return run.info.run_id


def _execute(
    env: StageEnv,
    client: MlflowClient,
    stage: str,
    key: str,
    directory: Path,
    stage_config: Any,
    data: Mapping[str, DataRef],
    upstream: Mapping[str, StagePointer],
    execute: Callable[[StageRun], StageOutcome],
    extra_tags: Mapping[str, str],
) -> StagePointer:
    run_id = _start_stage_run(env, client, stage, key, directory, upstream, extra_tags)
    monitor = _system_metrics(env, run_id)
    try:
        if stage_config is not None:
            tracking.log_params(client, run_id, tracking.flatten_params(stage_config, stage))
        for name, ref in data.items():
            tracking.log_dataset(
                client,
                run_id,
                name,
                read_rows(ref),
                ref.source,
                ref.digest,
                context="evaluation" if name.endswith("_eval") else "training",
            )
        run = StageRun(client, run_id, directory / caching.TRAIN_DIRNAME, tracking.MLflowLogger(client, run_id))
        outcome = execute(run)
        pointer = _record_outcome(env, client, stage, key, run, outcome, data)
    except BaseException as exc:
        if monitor is not None:
            monitor.finish()
        tracking.end_run(client, run_id, tracking.status_for(exc))
        raise
    if monitor is not None:
        monitor.finish()
    tracking.end_run(client, run_id, "FINISHED")
    return pointer


def _record_outcome(
    env: StageEnv,
    client: MlflowClient,
    stage: str,
    key: str,
    run: StageRun,
    outcome: StageOutcome,
    data: Mapping[str, DataRef],
) -> StagePointer:
    model_uri = None
    if outcome.model_dir is not None and env.config.tracking.log_model:
        model_uri = tracking.log_model_dir(client, run.run_id, outcome.model_dir)
    if outcome.model_dir is not None:
        # 0: trained from scratch; N > 0: resumed from checkpoint step N (after a crash, kill or timeout).
        tracking.set_tags(
            client,
            run.run_id,
            {"rlhf.resumed_from_step": outcome.resumed_from_step or 0, "rlhf.model_dir": outcome.model_dir},
        )
    plot = tracking.plot_curves(
        run.logger.history,
        outcome.curves,
        f"{env.config.name}: {stage}",
        run.output_dir / "plots" / f"{stage}_curves.png",
    )
    if plot is not None:
        client.log_artifact(run.run_id, str(plot), "plots")
    return StagePointer(
        stage=stage,
        cache_key=key,
        run_id=run.run_id,
        model_uri=model_uri,
        model_dir=str(outcome.model_dir) if outcome.model_dir is not None else None,
        data={name: ref.digest for name, ref in data.items()},
        datasets=outcome.datasets,
        metrics={k: float(v) for k, v in outcome.metrics.items()},
        resumed_from_step=outcome.resumed_from_step,
        extra=outcome.extra,
    )


def _system_metrics(env: StageEnv, run_id: str) -> Any | None:
    """MLflow's CPU/GPU/memory sampler on the stage run, when enabled and psutil is installed."""
    if not env.config.tracking.system_metrics:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    try:
        monitor = SystemMetricsMonitor(run_id, tracking_uri=env.config.tracking_uri())
    except Exception as exc:  # noqa: BLE001 — a missing optional sampler (psutil) must never fail a stage
        log.warning("system metrics disabled: %s", exc)
        return None
    monitor.start()
    return monitor
