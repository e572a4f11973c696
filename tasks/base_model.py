"""The base model every pipeline starts from: a local directory, a hub name, or `tiny` (built offline)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_core.atomic import atomic_replace_dir
from tasks.caching import file_lock
from tasks.pointers import StagePointer

if TYPE_CHECKING:
    from schemas.config import PipelineConfig


def directory_digest(path: Path) -> str:
    """`sha256:` over the relative names and contents of every non-hidden file under `path` (sorted)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def tiny_base_dir(config: PipelineConfig) -> Path:
    """`<work_dir>/base/tiny-seed<seed>`, built once by `rlhf_core.tiny.create_tiny_base` (atomically, under a
    lock, so concurrent pipelines build it once)."""
    from rlhf_core.tiny import create_tiny_base

    final = config.work_path() / "base" / f"tiny-seed{config.seed}"
    with file_lock(final.with_name(f".{final.name}.lock")):
        if not (final / "config.json").is_file():
            tmp = final.with_name(f".tmp-{final.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            create_tiny_base(tmp, seed=config.seed)
            atomic_replace_dir(tmp, final)
    return final


def resolve_base_model(config: PipelineConfig) -> StagePointer:
    """A `base` pointer: `model_dir`/`model_uri` = the local path (or the hub name), `cache_key` = its content
    digest (the name itself for a hub model, which we never download to hash)."""
    if config.base_model == "tiny":
        path = tiny_base_dir(config)
    else:
        path = Path(config.base_model).expanduser()
        if not path.exists():
            name = config.base_model
            return StagePointer(stage="base", cache_key="hub:" + name, model_uri=name, model_dir=name)
        path = path.resolve()
    return StagePointer(stage="base", cache_key=directory_digest(path), model_uri=str(path), model_dir=str(path))
