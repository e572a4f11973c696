"""MLflow helpers for the stage tasks: the experiment, parent and stage runs, the `MetricLogger` adapter, dataset
inputs, model artifacts, curve plots and the registry. The tags written here are the contract of
`docs/lineage.md`.

Every call goes through an explicit `MlflowClient` and run id (no fluent "active run"), so stage tasks running in
Prefect worker threads never see each other's runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

PACKAGE = "rlhf-pipeline"
# The library code a stage's result depends on; its content hash is part of every cache key.
SOURCE_PACKAGES = ("rlhf_core", "schemas", "tasks")
MODEL_ARTIFACT = "model"
MAX_PARAM_LENGTH = 6000
# MLflow 3's UI opens an experiment on its kind: "custom_model_development" ("Machine learning") shows the runs
# table; without the tag it may guess "genai_development" and open on the GenAI traces overview instead.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# --------------------------------------------------------------------------------------------------------------
# Code version
# --------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 (12 hex) over the paths and contents of every `.py` file of `rlhf_core`, `schemas` and `tasks`."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_version() -> str:
    """`<package version>+src.<source hash>`: changes whenever library code that trains or records changes."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"{version}+src.{source_hash()}"


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The repository's HEAD commit (with `-dirty` when the tree has changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


# --------------------------------------------------------------------------------------------------------------
# Experiment and runs
# --------------------------------------------------------------------------------------------------------------


UI_URL_ENV = "RLHF_MLFLOW_UI_URL"
"""An MLflow server showing the pipeline's local store (`scripts/serve_local.sh` sets it for its worker)."""


def ui_url(tracking_uri: str) -> str | None:
    """The MLflow UI that shows the store at `tracking_uri`: the tracking server itself when the store is one,
    else `$RLHF_MLFLOW_UI_URL` (an `mlflow server` over the same local store), else None (nothing serves it)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    served = os.environ.get(UI_URL_ENV, "").strip()
    return served.rstrip("/") or None


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page on `ui_url(tracking_uri)`, or None when nothing serves the store."""
    base = ui_url(tracking_uri)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if base else None


def tracking_client(tracking_uri: str) -> MlflowClient:
    """A client bound to one tracking + registry store (and the process default, for artifact helpers)."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created with `artifact_location` if it does not exist (a deleted experiment
    of that name is restored), marked as a model-training experiment (`mlflow.experimentKind`) so the MLflow UI
    opens on its runs table — existing experiments too."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:
            # Another pipeline created it in between.
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """A (nested) dataclass / mapping as flat `prefix.key.sub` → string params (None → "None")."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, Mapping):
        out: dict[str, str] = {}
        for key, value in obj.items():
            out.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, (list, tuple)):
        return {prefix: ",".join(str(v) for v in obj)}
    return {prefix: str(obj)[:MAX_PARAM_LENGTH]}


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of 100 (the store's limit per call)."""
    items = [Param(k, v) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set string tags in one call (None values are skipped)."""
    items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[start : start + 100])


def run_exists(client: MlflowClient, run_id: str | None, artifact: str | None = None) -> bool:
    """True when run `run_id` exists, is active (not deleted) and FINISHED, and — if `artifact` is given — that
    artifact path still lists files (a deleted artifact folder makes a cached pointer stale)."""
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.lifecycle_stage != "active" or run.info.status != "FINISHED":
        return False
    if artifact is None:
        return True
    try:
        return bool(client.list_artifacts(run_id, artifact))
    except (MlflowException, OSError):
        return False


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """Terminate a run with `status` (FINISHED, FAILED, KILLED)."""
    client.set_terminated(run_id, status=status)


def status_for(exc: BaseException) -> str:
    """How a run ended by `exc` is closed: KILLED when it was stopped (Ctrl-C, SIGTERM — which Prefect raises
    as `TerminationSignal` inside a flow run — or an exit), FAILED when it broke."""
    from prefect.exceptions import TerminationSignal

    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit, TerminationSignal)) else "FAILED"


def mark_killed_if_running(client: MlflowClient, run_id: str) -> bool:
    """A run left RUNNING by a process that died (SIGKILL, OOM) is closed as KILLED; True if it was."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
        client.set_terminated(run_id, status="KILLED")
        return True
    return False


# --------------------------------------------------------------------------------------------------------------
# Step metrics
# --------------------------------------------------------------------------------------------------------------


class MLflowLogger:
    """`rlhf_core.callbacks.MetricLogger` → MLflow step metrics of one run (one batched call per report).

    Also keeps the history in memory (`history[name] = [(step, value), ...]`) for the curve plots.
    Non-finite values are logged as is: MLflow stores nan/inf, and hiding them would hide a divergence.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        batch = [Metric(name, float(value), timestamp, int(step)) for name, value in metrics.items()]
        for metric in batch:
            self.history.setdefault(metric.key, []).append((metric.step, metric.value))
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])


# --------------------------------------------------------------------------------------------------------------
# Datasets, models, plots
# --------------------------------------------------------------------------------------------------------------


def log_dataset(
    client: MlflowClient, run_id: str, name: str, rows: list[dict], source: str, digest: str, context: str
) -> None:
    """Log `rows` as an MLflow dataset input named `name` with OUR full-content digest (MLflow's own hashes a
    sample), plus the tag `rlhf.data.<name>.digest`. MLflow caps a dataset digest at 36 characters, so the input
    carries the first 32 hex digits and the tag the whole digest (the tag is authoritative). Nested values (chat
    messages) are stored as JSON strings so the schema stays flat."""
    frame = pd.DataFrame([{k: v if isinstance(v, str) else to_json(v) for k, v in row.items()} for row in rows])
    short = digest.rpartition(":")[2][:32]
    with warnings.catch_warnings():
        # A local path matches two equivalent MLflow source types; it picks one and warns on every dataset.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=short)
    client.log_inputs(
        run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    )
    client.set_tag(run_id, f"rlhf.data.{name}.digest", digest)


def to_json(value: Any) -> str:
    """Compact JSON of a nested value (chat messages) for a flat table cell."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def log_model_dir(client: MlflowClient, run_id: str, model_dir: str | Path) -> str:
    """Upload a Hugging Face model directory (safetensors + tokenizer) as the run artifact `model/`; returns
    `runs:/<run_id>/model`, loadable by `from_pretrained(mlflow.artifacts.download_artifacts(uri))`."""
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    """Write `text` as the artifact `artifact_file` (e.g. `validation_report.md`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(text)
        parent = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), None if parent == "." else parent)


def plot_curves(
    history: Mapping[str, list[tuple[int, float]]], names: Iterable[str], title: str, path: Path
) -> Path | None:
    """One PNG with a subplot per metric of `names` present in `history` (value vs step); None if none is."""
    present = [n for n in names if history.get(n)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in Prefect workers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(present), 1, figsize=(6, 2.4 * len(present)), squeeze=False)
    for ax, name in zip(axes[:, 0], present, strict=True):
        steps, values = zip(*history[name], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------


def register_version(client: MlflowClient, name: str, run_id: str, tags: Mapping[str, Any]) -> str:
    """The version of registered model `name` whose source is `runs:/<run_id>/model`, created if missing (so a
    rerun of a cached pipeline does not add versions). Returns the version number."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Final RLHF policies of the pipeline.")
        except MlflowException:
            pass  # created concurrently
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return str(version.version)
    version = client.create_model_version(
        name,
        f"runs:/{run_id}/{MODEL_ARTIFACT}",
        run_id=run_id,
        tags={k: str(v) for k, v in tags.items() if v is not None},
    )
    return str(version.version)


def alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    """The model version `name@alias`, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_model(client: MlflowClient, name: str, cache_dir: Path) -> tuple[Any, str] | None:
    """`(model version, local model directory)` of `name@champion`, or None when there is no champion. The model
    is the version's local training output when it is still there, else downloaded once into `cache_dir/<run>`."""
    version = alias_version(client, name, "champion")
    if version is None or not version.run_id:
        return None
    local = client.get_run(version.run_id).data.tags.get("rlhf.model_dir")
    if local and (Path(local) / "config.json").is_file():
        return version, local
    target = cache_dir / version.run_id
    if not (target / MODEL_ARTIFACT / "config.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(version.run_id, MODEL_ARTIFACT, str(target))
    return version, str(target / MODEL_ARTIFACT)
