"""A pipeline's MLflow parent run ends when its process ends: interrupted (Ctrl-C, SIGTERM) it is closed as
KILLED by the pipeline itself; killed outright (SIGKILL) it is closed as KILLED by the next pipeline start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from prefect.exceptions import TerminationSignal

from flows.config import load_config
from tasks import parent_runs, tracking

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "support_bot"

# A pipeline process whose DAG blocks (no Prefect server needed: the flow function is called directly).
BLOCKING_PIPELINE = """
import sys, time
from pathlib import Path
import flows.pipeline as pipeline

def run_dag(env):
    Path(sys.argv[2]).write_text(env.parent_run_id)
    time.sleep(120)

pipeline.run_dag = run_dag
pipeline.rlhf_pipeline.fn(sys.argv[1])
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    config = {
        "name": "parent-runs",
        "base_model": "tiny",
        "algorithm": "dpo",
        "work_dir": str(tmp_path / "runs"),
        "datasets": {
            "demonstrations": {"path": str(DATA / "demonstrations.jsonl"), "limit": 8},
            "preferences": {"path": str(DATA / "preferences.jsonl"), "limit": 8},
            "prompts_train": {"path": str(DATA / "prompts_train.jsonl"), "limit": 4},
            "prompts_eval": {"path": str(DATA / "prompts_eval.jsonl"), "limit": 4},
        },
        # Explicit: an MLFLOW_TRACKING_URI left in the environment by an earlier test must not send the
        # subprocess's runs elsewhere.
        "tracking": {"experiment_name": "parent-runs", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _client(config_path: Path) -> MlflowClient:
    uri = load_config(config_path).tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _start(config_path: Path, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "WARNING"}
    command = [sys.executable, "-c", BLOCKING_PIPELINE, str(config_path), str(marker)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(process: subprocess.Popen, marker: Path) -> str:
    deadline = time.monotonic() + 120
    while not marker.is_file():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the pipeline did not start"
        time.sleep(0.1)
    return marker.read_text()


def test_interrupts_close_the_run_as_killed_and_errors_as_failed() -> None:
    assert tracking.status_for(KeyboardInterrupt()) == "KILLED"
    assert tracking.status_for(TerminationSignal(signal.SIGTERM)) == "KILLED"
    assert tracking.status_for(SystemExit(143)) == "KILLED"
    assert tracking.status_for(RuntimeError("boom")) == "FAILED"


def test_a_sigtermed_pipeline_closes_its_parent_run_as_killed(config_path: Path, tmp_path: Path) -> None:
    """Given a real pipeline process inside its DAG, when it gets SIGTERM, then it exits and its parent run is
    KILLED, not left RUNNING."""
    process = _start(config_path, tmp_path / "started")
    run_id = _wait_for(process, tmp_path / "started")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert _client(config_path).get_run(run_id).info.status == "KILLED"
    assert not parent_runs.lock_path(load_config(config_path).work_path(), run_id).exists()


def test_the_next_start_closes_the_parent_run_of_a_sigkilled_pipeline(config_path: Path, tmp_path: Path) -> None:
    """Given a pipeline SIGKILLed inside its DAG (its parent run stays RUNNING), when a pipeline of the same
    name starts, then it closes that run as KILLED — and never the run of a pipeline still running."""
    dead = _start(config_path, tmp_path / "dead")
    dead_run = _wait_for(dead, tmp_path / "dead")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    client = _client(config_path)
    assert client.get_run(dead_run).info.status == "RUNNING"

    alive = _start(config_path, tmp_path / "alive")
    try:
        alive_run = _wait_for(alive, tmp_path / "alive")
        killed = client.get_run(dead_run)
        assert killed.info.status == "KILLED" and killed.data.tags["rlhf.closed_as"] == "process gone"

        config = load_config(config_path)
        experiment_id = client.get_experiment_by_name("parent-runs").experiment_id
        assert parent_runs.close_dead_runs(client, experiment_id, config.name, config.work_path()) == []
        assert client.get_run(alive_run).info.status == "RUNNING"
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------------------------------------------------------
# What the parent run shows in the MLflow runs table
# ---------------------------------------------------------------------------------------------------------------


def test_the_experiment_opens_on_the_runs_table_new_or_existing(tmp_path: Path) -> None:
    """MLflow 3's UI opens an experiment by its `mlflow.experimentKind`: a pipeline's experiment is a model
    training one, whether the pipeline created it or found it made earlier without the tag."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("made-before")

    assert tracking.ensure_experiment(client, "made-before", None) == old
    created = tracking.ensure_experiment(client, "new", None)

    for experiment_id in (old, created):
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize(("algorithm", "setting"), [("dpo", "dpo.dpo_beta"), ("ppo", "ppo.kl_coef")])
def test_the_parent_run_is_named_with_algorithm_and_time_and_carries_key_settings_and_eval_metrics(
    config_path: Path, algorithm: str, setting: str
) -> None:
    from flows.pipeline import finish_pipeline, log_headline_metrics, start_pipeline_run
    from tasks.pointers import StagePointer

    config = load_config(config_path, [f"algorithm={algorithm}"])
    env = start_pipeline_run(config)
    evaluation = StagePointer(
        stage="evaluate",
        cache_key="k",
        run_id="r",
        metrics={"eval/win_rate_gold": 0.75, "eval/kl_to_ref": 0.5, "eval/gold_score": 1.5},
    )
    log_headline_metrics(env, evaluation)
    finish_pipeline(env, {}, "FINISHED")

    run = _client(config_path).get_run(env.parent_run_id)
    assert re.fullmatch(rf"parent-runs-{algorithm}-\d{{8}}-\d{{6}}", run.info.run_name)
    params = run.data.params
    assert params["algorithm"] == algorithm and params["base_model"] == "tiny"
    assert params[setting] == str(getattr(getattr(config, algorithm), setting.split(".")[1]))
    for stage in ("sft", "reward_model", algorithm):
        assert params[f"{stage}.max_steps"] == str(getattr(config, stage).max_steps)
    assert run.data.metrics == evaluation.metrics
