"""What travels between stage tasks: small pointers (run ids, URIs, paths, digests), never weights or rows."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class DataRef(BaseModel):
    """One validated dataset, stored canonically (JSON lines) under `<work_dir>/data/` by the validate stage."""

    model_config = ConfigDict(frozen=True)

    name: str
    """Role in the pipeline: `sft_train`, `sft_eval`, `preference_train`, `preference_eval`, `prompts_train`,
    `prompts_eval`."""
    kind: str
    """Row kind: `demonstration`, `preference`, `ranking` or `prompt`."""
    digest: str
    """Our full-content digest of the canonical rows (`schemas.content_digest`)."""
    path: str
    """The canonical JSON-lines file (content-addressed: its name holds the digest)."""
    source: str
    """Where the rows came from (the config's path or hub name)."""
    num_rows: int


class StagePointer(BaseModel):
    """The result of one stage, executed now or reused from the cache.

    `base` pointers (the base model) have no run: `model_uri` is the local path or hub name and `cache_key` the
    model's content digest.
    """

    model_config = ConfigDict(frozen=True)

    stage: str
    """`validate`, `sft`, `reward_model`, `ppo`, `dpo`, `evaluate` or `base`."""
    cache_key: str
    """sha256 of the stage config, data digests, upstream cache keys and code version."""
    run_id: str | None = None
    """The MLflow stage run that produced it."""
    model_uri: str | None = None
    """`runs:/<run_id>/model` (or the base model's path / hub name)."""
    model_dir: str | None = None
    """Local Hugging Face directory of the model (what the next stage trains from)."""
    data: dict[str, str] = {}
    """Digest of every dataset the stage read, by name."""
    datasets: dict[str, DataRef] = {}
    """The validate stage's outputs (empty for the other stages)."""
    metrics: dict[str, float] = {}
    """Final metrics of the stage (for evaluate: the candidate policy's `eval/*`)."""
    resumed_from_step: int | None = None
    """Checkpoint step the trainer resumed from when the stage ran (None: started fresh or reused)."""
    reused: bool = False
    """True when this pipeline run took the pointer from the cache instead of executing the stage."""
    extra: dict[str, Any] = {}
    """Stage-specific small values (e.g. the evaluated models' run ids)."""
