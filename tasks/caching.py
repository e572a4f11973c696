"""Stage caching, resume and mutual exclusion — our own cache index in the work dir, not Prefect's.

Why not a Prefect cache policy: Prefect's DEFAULT policy hashes the flow-run id (nothing is ever reused across
runs), TASK_SOURCE hashes only the task's own lines, and no policy can check that the MLflow run and model a
cached result points to still exist. So each stage gets a directory named by its cache key:

    <work_dir>/stages/<stage>-<key[:16]>/
        .lock           fcntl lock: one process at a time trains (or reads) this stage
        .active_run     id of the MLflow run of an execution in progress (closed as KILLED if its process died)
        train/          the trainer's output_dir: checkpoints/step-N/ and model/
        pointer.json    written last, atomically: the finished stage's `StagePointer`

    key = sha256(stage, stage config, data digests, upstream cache keys, code version)

- A finished stage is reused when `pointer.json` exists AND its MLflow run is FINISHED and active AND its model
  artifact and local model directory exist; otherwise the directory is cleared and the stage reruns.
- A stage that died (SIGKILL, timeout, a failed try before a Prefect retry) left checkpoints but no pointer: the
  next execution calls the trainer with the same `train/` directory, which resumes from the newest checkpoint.
- Two pipelines needing the same stage block on its lock; the second finds the first's pointer and reuses it.
  Different keys are different directories, so concurrent pipelines never write into each other's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from rlhf_core.atomic import atomic_write_text
from tasks.pointers import StagePointer
from tasks.tracking import MODEL_ARTIFACT, run_exists

POINTER_FILE = "pointer.json"
LOCK_FILE = ".lock"
ACTIVE_RUN_FILE = ".active_run"
TRAIN_DIRNAME = "train"


def _canonical(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return obj


def cache_key(
    stage: str,
    stage_config: Any,
    data_digests: Mapping[str, str],
    upstream: Mapping[str, StagePointer],
    code_version: str,
) -> str:
    """sha256 hex of the canonical JSON of everything a stage's result depends on.

    Upstream stages enter by their cache keys (not run ids), so the key is a pure function of the configs and the
    data along the whole DAG: rerunning an upstream stage with the same inputs does not invalidate downstream.
    """
    material = {
        "stage": stage,
        "config": _canonical(stage_config),
        "data": dict(sorted(data_digests.items())),
        "upstream": {role: p.cache_key for role, p in sorted(upstream.items())},
        "code_version": code_version,
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_dir(work_dir: str | Path, stage: str, key: str) -> Path:
    """`<work_dir>/stages/<stage>-<key[:16]>` (created)."""
    path = Path(work_dir) / "stages" / f"{stage}-{key[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive `fcntl.flock` on `path` for the duration of the block (blocks until free). The kernel drops the
    lock when the holder dies, so a SIGKILLed pipeline never leaves a stale lock behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def stage_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    """The lock of one stage directory."""
    return file_lock(directory / LOCK_FILE)


def read_pointer(directory: Path) -> StagePointer | None:
    """The finished stage's pointer, or None (never finished, or an unreadable file)."""
    path = directory / POINTER_FILE
    try:
        return StagePointer.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def write_pointer(directory: Path, pointer: StagePointer) -> None:
    """Write `pointer.json` atomically (temp file, fsync, rename): a pointer that exists is complete."""
    atomic_write_text(directory / POINTER_FILE, pointer.model_dump_json(indent=2))


def stale_reason(pointer: StagePointer, client: MlflowClient) -> str | None:
    """Why a cached pointer cannot be reused (None: it can): its MLflow run is gone, deleted or unfinished, its
    model artifact was deleted, or its local model directory is gone."""
    model_artifact = MODEL_ARTIFACT if pointer.model_uri and pointer.model_uri.startswith("runs:/") else None
    if not run_exists(client, pointer.run_id, model_artifact):
        return f"MLflow run {pointer.run_id} or its artifacts no longer exist"
    if pointer.model_dir is not None and not (Path(pointer.model_dir) / "config.json").is_file():
        return f"model directory {pointer.model_dir} no longer exists"
    return None


def clear_stage(directory: Path) -> None:
    """Remove a stale stage's pointer and training output (the lock file stays: other processes hold it open)."""
    (directory / POINTER_FILE).unlink(missing_ok=True)
    shutil.rmtree(directory / TRAIN_DIRNAME, ignore_errors=True)


def read_active_run(directory: Path) -> str | None:
    path = directory / ACTIVE_RUN_FILE
    return path.read_text().strip() or None if path.is_file() else None


def write_active_run(directory: Path, run_id: str | None) -> None:
    path = directory / ACTIVE_RUN_FILE
    if run_id is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(run_id)


def module_source_digest(spec: str) -> str:
    """What a `"module:function"` setting's results depend on beyond the code version: the sha256 of the named
    module's source file (the spec itself when the module is not a plain file), so editing a user's judge or
    reward function invalidates the stages that used it."""
    import importlib.util

    spec_ = importlib.util.find_spec(spec.partition(":")[0])
    if spec_ is not None and spec_.origin and Path(spec_.origin).is_file():
        return "sha256:" + hashlib.sha256(Path(spec_.origin).read_bytes()).hexdigest()
    return spec
