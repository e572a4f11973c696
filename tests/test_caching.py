"""Cache keys, pointers and locks of `tasks/caching.py`: given a stage's inputs, when one of them changes, then the
key changes (and only then); a pointer whose MLflow run is gone is stale; the stage lock excludes other holders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow import MlflowClient

from rlhf_core.trainers.dpo import DPOConfig
from tasks import caching, tracking
from tasks.pointers import StagePointer

REPO = Path(__file__).resolve().parents[1]
SFT = StagePointer(stage="sft", cache_key="k-sft", run_id="r1", model_uri="runs:/r1/model")
DATA = {"preference_train": "sha256:aa", "preference_eval": "sha256:bb"}


def _key(**changes: object) -> str:
    args = {
        "stage": "dpo",
        "stage_config": DPOConfig(),
        "data_digests": DATA,
        "upstream": {"sft": SFT},
        "code_version": "1.0+src.abc",
        **changes,
    }
    return caching.cache_key(**args)  # type: ignore[arg-type]


def test_the_key_depends_on_exactly_the_stage_inputs() -> None:
    base = _key()

    # Same inputs (dict order, run ids of upstream) → same key: upstream enters by its cache key only.
    assert _key(data_digests=dict(reversed(DATA.items()))) == base
    assert _key(upstream={"sft": SFT.model_copy(update={"run_id": "other", "reused": True})}) == base
    # Any real input change → a new key.
    changed = [
        _key(stage_config=DPOConfig(dpo_beta=0.2)),
        _key(data_digests={**DATA, "preference_train": "sha256:cc"}),
        _key(upstream={"sft": SFT.model_copy(update={"cache_key": "k-sft-2"})}),
        _key(code_version="1.0+src.def"),
        _key(stage="other"),
    ]
    assert len({base, *changed}) == 6


def test_code_version_is_the_package_version_plus_a_hash_of_the_library_sources() -> None:
    version = tracking.code_version()

    assert version.endswith(f"+src.{tracking.source_hash()}")
    assert len(tracking.source_hash()) == 12


def _source_hash_of(tree: Path) -> str:
    """`tracking.source_hash()` as a fresh interpreter computes it for the sources under `tree`."""
    code = "from tasks import tracking; print(tracking.source_hash())"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_a_change_to_library_code_changes_the_code_version_and_so_every_cache_key(tmp_path: Path) -> None:
    # Given a copy of the library sources, hashed by a separate interpreter.
    for package in ("rlhf_core", "schemas", "tasks"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = _source_hash_of(tmp_path)
    # When one line of a trainer or of the math changes, then the hash (part of every stage's key) changes.
    for changed in ("rlhf_core/losses.py", "rlhf_core/trainers/dpo.py", "schemas/rules.py", "tasks/runner.py"):
        path = tmp_path / changed
        original = path.read_text()
        path.write_text(original + "\n# a change\n")
        assert _source_hash_of(tmp_path) != before, changed
        path.write_text(original)
    # And an unchanged copy hashes like the original tree: the hash is of the content, not of where it lives.
    assert _source_hash_of(tmp_path) == before == tracking.source_hash()


def test_a_pointer_is_stale_once_its_run_or_model_is_gone(tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    run = client.create_run(exp).info.run_id
    uri = tracking.log_model_dir(client, run, model_dir)
    client.set_terminated(run)
    pointer = StagePointer(stage="sft", cache_key="k", run_id=run, model_uri=uri, model_dir=str(model_dir))

    assert caching.stale_reason(pointer, client) is None
    (model_dir / "config.json").unlink()
    assert "model directory" in caching.stale_reason(pointer, client)
    (model_dir / "config.json").write_text("{}")
    client.delete_run(run)
    assert "no longer exist" in caching.stale_reason(pointer, client)
    assert "no longer exist" in caching.stale_reason(pointer.model_copy(update={"run_id": "f" * 32}), client)


def test_pointers_round_trip_and_the_stage_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    directory = caching.stage_dir(tmp_path, "dpo", "ab" * 32)
    assert directory.name == "dpo-" + "ab" * 8
    caching.write_pointer(directory, SFT)
    assert caching.read_pointer(directory) == SFT

    order: list[str] = []

    def second() -> None:
        with caching.stage_lock(directory):
            order.append("second")

    with caching.stage_lock(directory):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        order.append("first")
    thread.join()
    assert order == ["first", "second"]
