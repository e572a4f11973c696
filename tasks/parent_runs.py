"""A pipeline's MLflow parent run stays RUNNING only while its process lives.

A live pipeline holds an `fcntl` lock on `<work_dir>/pipeline_runs/<parent_run_id>.lock` for as long as its
parent run is open; the kernel drops the lock when the process dies, however it dies (SIGKILL, OOM, a lost
machine). So when a pipeline starts, a RUNNING parent run of the same pipeline whose lock can be taken belongs
to a dead process: it is closed as KILLED — the parent-run twin of the stage runs' `.active_run` check
(`tasks/caching.py`). A run without a lock file (another work dir, another machine) is left alone: nothing
says its process is gone.

An interrupted pipeline closes its own parent run as KILLED (`tracking.status_for`): Ctrl-C raises
KeyboardInterrupt; SIGTERM raises Prefect's `TerminationSignal` inside a flow run and, where nothing else
handles it (the flow function called directly), `SystemExit(143)` from the handler `hold` installs.
"""

from __future__ import annotations

import fcntl
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import IO, Any

from mlflow import MlflowClient

from tasks import tracking

log = logging.getLogger(__name__)

LOCKS_DIRNAME = "pipeline_runs"

_held: dict[str, IO[str]] = {}
_default_sigterm: dict[str, Any] = {}


def lock_path(work_dir: Path, run_id: str) -> Path:
    return Path(work_dir) / LOCKS_DIRNAME / f"{run_id}.lock"


def hold(work_dir: Path, run_id: str) -> None:
    """Take the lock of parent run `run_id` until `release` (or until this process ends)."""
    path = lock_path(work_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - kept open while the run lives
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held[run_id] = handle
    # Python's default SIGTERM ends the process without unwinding, so the run would stay RUNNING until the
    # next pipeline closes it; raising lets the flow close it now. Prefect's own handler, if any, stays.
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            _default_sigterm[run_id] = signal.SIG_DFL


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def release(work_dir: Path, run_id: str) -> None:
    """Drop the lock of a closed parent run and its file (and the SIGTERM handler `hold` installed)."""
    handle = _held.pop(run_id, None)
    if handle is not None:
        lock_path(work_dir, run_id).unlink(missing_ok=True)
        handle.close()
    if run_id in _default_sigterm and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _default_sigterm.pop(run_id))


def _owner_is_gone(path: Path) -> bool:
    """True when nobody holds the lock at `path` (its file is then removed)."""
    if not path.is_file():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        path.unlink(missing_ok=True)
        return True


def close_dead_runs(client: MlflowClient, experiment_id: str, pipeline: str, work_dir: Path) -> list[str]:
    """Close as KILLED the RUNNING parent runs of `pipeline` whose process is gone; returns their ids."""
    running = client.search_runs(
        [experiment_id],
        "tags.`rlhf.kind` = 'pipeline' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    closed = []
    for run in running:
        run_id = run.info.run_id
        if run.data.tags.get("rlhf.pipeline") != pipeline or run_id in _held:
            continue
        if _owner_is_gone(lock_path(work_dir, run_id)) and tracking.mark_killed_if_running(client, run_id):
            tracking.set_tags(client, run_id, {"rlhf.closed_as": "process gone"})
            log.warning(
                "pipeline %s: parent run %s was left RUNNING by a dead process; closed as KILLED",
                pipeline,
                run_id,
            )
            closed.append(run_id)
    return closed
