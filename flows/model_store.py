"""Models by reference: a local directory, or an MLflow URI (`models:/<name>@<alias>`, `models:/<name>/<version>`,
`runs:/<run id>/<path>`) downloaded once into a local cache. What `rlhf generate`, `rlhf chat` and
`rlhf_core.inference` load goes through here; only safetensors weights are accepted."""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_core.atomic import atomic_replace_dir

if TYPE_CHECKING:
    from mlflow import MlflowClient

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


class ModelNotFound(ValueError):
    """A model reference that names no loadable Hugging Face model (or only pickle weights)."""


class ModelLookupFailed(ModelNotFound):
    """A well-formed MLflow URI that the tracking server could not resolve (no such model, alias or run)."""


def mlflow_client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _model_cache_key(uri: str, client: MlflowClient) -> tuple[str, str]:
    """(cache sub-directory, URI to download) for an MLflow model URI.

    An alias is resolved to its version first, so the cache never serves the old champion after the alias moved,
    and the download cannot race a promotion. A registered version is downloaded from its source (`runs:/…`):
    MLflow's `models:/` download asks the process-wide registry, not the one passed to it.
    """
    if match := re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri):
        name, alias = match.groups()
        version = client.get_model_version_by_alias(name, alias).version
        return f"models/{name}/v{version}", client.get_model_version_download_uri(name, version)
    if match := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
        name, version = match.groups()
        return f"models/{name}/v{version}", client.get_model_version_download_uri(name, version)
    if match := re.fullmatch(r"runs:/([0-9a-zA-Z]+)/(.+)", uri):
        run_id, path = match.groups()
        return f"runs/{run_id}/{path.strip('/')}", uri
    if match := re.fullmatch(r"models:/(m-[0-9a-f]+)", uri):
        return f"logged/{match[1]}", uri
    raise ModelNotFound(
        f"{uri!r} is neither an existing directory nor an MLflow model URI "
        "(models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/<path>)"
    )


def find_hf_model_dir(root: Path) -> Path:
    """The Hugging Face model directory inside `root` (itself, or e.g. `model/` of an MLflow model artifact).

    Refuses pickle-format weights: only safetensors are loaded, since unpickling a downloaded file can run code.
    """
    candidates = sorted((p.parent for p in root.rglob("config.json")), key=lambda p: (len(p.parts), str(p)))
    for directory in candidates:
        if any(directory.glob("*.safetensors")):
            return directory
    pickles = [str(p.relative_to(root)) for pattern in PICKLE_WEIGHTS for p in root.rglob(pattern)]
    if pickles:
        raise ModelNotFound(
            f"{root} holds only pickle-format weights ({', '.join(sorted(pickles))}); convert them to safetensors first"
        )
    raise ModelNotFound(f"no Hugging Face model (config.json + *.safetensors) found under {root}")


def resolve_model_dir(
    model: str, tracking_uri: str, cache_dir: Path, status: Callable[[str], ContextManager[object]] | None = None
) -> Path:
    """A local directory `from_pretrained` can load, for a path, `models:/…` or `runs:/…` URI.

    MLflow artifacts are downloaded once into `cache_dir/<models|runs>/…`; the download goes to a temporary
    directory renamed into place, so a cache entry that exists is complete. `status(message)`, when given, is a
    context manager shown while downloading (the CLI's spinner).
    """
    local = Path(model).expanduser()
    if local.exists():
        return find_hf_model_dir(local)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        key, download_uri = _model_cache_key(model, client)
    except MlflowException as exc:
        raise ModelLookupFailed(f"cannot resolve {model} in {tracking_uri}: {exc.message}") from exc
    target = cache_dir / key
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            with (status or (lambda _: contextlib.nullcontext()))(f"Downloading {download_uri} …"):
                mlflow.artifacts.download_artifacts(
                    artifact_uri=download_uri,
                    dst_path=str(staging),
                    tracking_uri=tracking_uri,
                    registry_uri=tracking_uri,
                )
            atomic_replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return find_hf_model_dir(target)
