"""Exact resume at the pipeline level: an interrupted training stage ends with the weights of an uninterrupted one.

Given the tiny test pipeline (`test_pipeline.pipeline_config`) with a few more steps per training stage and a
checkpoint every 2 steps, and the final weights of each stage from an uninterrupted run of the same config in
another work dir (so nothing is reused from its cache):
- when a real pipeline process (`python -m flows.pipeline`) is SIGKILLed, with its whole process group, during
  SFT, the reward model, DPO, PPO or RLOO once that stage has written a complete checkpoint (manifest present),
  then the next run resumes the stage from that checkpoint and every tensor of its final `model.safetensors` equals the
  uninterrupted run's;
- when the SFT task fails once after its step-2 checkpoint (`prefect.stages.sft.retries: 1`), then Prefect runs it
  a second time (one task run, run_count 2), the retry resumes from step 2 and the weights equal the uninterrupted
  run's;
- when PPO hangs past `prefect.stages.ppo.timeout_seconds` after its step-2 checkpoint, then Prefect stops it (the
  flow fails with the task TimedOut, the MLflow stage run is closed) and the next run resumes PPO from step 2 to
  the uninterrupted run's weights.

How Prefect 3.9 enforces a sync task's timeout here: the flow and its tasks run in the calling (main) thread, so
`prefect.utilities.timeout.timeout` arms SIGALRM (`AlarmCancelScope`); the handler raises `CancelledError` in the
trainer at the next Python bytecode (a running torch op finishes first, a `time.sleep` is interrupted), the stage
runner closes the MLflow run as FAILED and re-raises, and Prefect records `TaskRunTimeoutError` (state TimedOut).
In a worker thread Prefect would instead inject the exception asynchronously, which no blocking call interrupts.

The tests of one module share the work dirs and run in file order (later ones reuse earlier upstream stages).
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from safetensors.torch import load_file
from test_pipeline import REPO, pipeline_config

import tasks.ppo
import tasks.sft
from flows.pipeline import PipelineResult, rlhf_pipeline

pytestmark = pytest.mark.slow

MAX_STEPS = 12  # steps per supervised stage; a checkpoint every 2: a kill at the first one leaves 10 to go
PPO_STEPS = 8
OVERRIDES = {
    "sft": ["stages=[validate, sft]"],
    "reward_model": ["stages=[validate, sft, reward_model]"],
    "dpo": ["stages=[validate, sft, dpo]"],
    "ppo": ["algorithm=ppo", "stages=[validate, sft, reward_model, ppo]"],
    # RLOO covers the critic-free trainer (GRPO differs only in its advantages); the stage is named after the
    # algorithm, the section is `grpo`.
    "rloo": ["algorithm=rloo", "stages=[validate, sft, reward_model, rloo]"],
}


def resume_config(root: Path, work: str) -> Path:
    """The config under `root/work`: the same for every work dir (cache.code_version included)."""
    config = pipeline_config(root)
    config["work_dir"] = str(root / work)
    for stage in ("sft", "reward_model", "dpo"):
        config[stage] = {**config[stage], "max_steps": MAX_STEPS, "checkpoint_every": 2}
    config["ppo"] = {**config["ppo"], "max_steps": PPO_STEPS, "checkpoint_every": 2}
    config["grpo"] = {
        "batch_size": 4,
        "prompts_per_iteration": 2,
        "num_samples_per_prompt": 2,
        "max_new_tokens": 8,
        "max_prompt_len": 48,
        "max_steps": PPO_STEPS,
        "checkpoint_every": 2,
        "progress_bar": False,
        "weak_reward_model": "warn",
        "dead_signal": "warn",
    }
    path = root / f"{work}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Root:
    """One module's configs: `reference` (uninterrupted runs), `resume` (the kill tests), `flaky` (the retry and
    timeout tests)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.configs = {work: resume_config(root, work) for work in ("reference", "resume", "flaky")}
        self._references: dict[str, PipelineResult] = {}

    def reference(self, stage: str) -> PipelineResult:
        """The uninterrupted run that ends with `stage` (run once; upstream stages reused from earlier ones)."""
        if stage not in self._references:
            result = rlhf_pipeline(str(self.configs["reference"]), OVERRIDES[stage])
            assert result.stages[stage].resumed_from_step is None
            self._references[stage] = result
        return self._references[stage]

    def checkpoints(self, work: str, stage: str) -> list[str]:
        """The complete checkpoints (manifest written) of `stage` in work dir `work`."""
        return glob.glob(
            str(self.root / work / "stages" / f"{stage}-*" / "train" / "checkpoints" / "step-*" / "manifest.json")
        )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Root:
    return Root(tmp_path_factory.mktemp("resume"))


def rlhf_client(result: PipelineResult) -> MlflowClient:
    return MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)


def assert_same_weights(result: PipelineResult, reference: PipelineResult, stage: str) -> None:
    """Every tensor of the stage's final `model.safetensors` equals the reference's."""
    ours = load_file(Path(result.stages[stage].model_dir) / "model.safetensors")
    theirs = load_file(Path(reference.stages[stage].model_dir) / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def kill_once_checkpointed(root: Root, stage: str, prefect_api: str) -> None:
    """Start the pipeline as its own process (group) and SIGKILL the group once `stage` has a checkpoint."""
    # Without the MLFLOW_*_URI that `mlflow.set_tracking_uri` left in this process's environment (the store of
    # the last pipeline run here): the subprocess must log to the config's own store, as the rerun will.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env |= {
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": str(REPO),
        # One intra-op thread, as in this process (tests/conftest.py): the same float reductions.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", str(root.configs["resume"]), *OVERRIDES[stage]],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while not root.checkpoints("resume", stage):
            assert proc.poll() is None, f"the pipeline ended before {stage} wrote a checkpoint"
            assert time.monotonic() < deadline, f"no {stage} checkpoint appeared"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if the pipeline ended by itself
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("stage", ["sft", "reward_model", "dpo", "ppo", "rloo"])
def test_a_pipeline_killed_during_a_stage_ends_with_the_uninterrupted_weights(
    root: Root, stage: str, prefect_api: str
) -> None:
    reference = root.reference(stage)

    # Given a real pipeline process SIGKILLed once the stage has a complete checkpoint.
    kill_once_checkpointed(root, stage, prefect_api)

    # When the pipeline runs again.
    result = rlhf_pipeline(str(root.configs["resume"]), OVERRIDES[stage])

    # Then the stage resumed from a checkpoint before its last step, and ended where the uninterrupted run did.
    pointer = result.stages[stage]
    last = PPO_STEPS if stage in ("ppo", "rloo") else MAX_STEPS
    assert not pointer.reused
    assert pointer.resumed_from_step is not None and 0 < pointer.resumed_from_step < last
    assert pointer.cache_key == reference.stages[stage].cache_key
    tracking = rlhf_client(result)
    tags = tracking.get_run(pointer.run_id).data.tags
    assert tags["rlhf.resumed_from_step"] == str(pointer.resumed_from_step)
    assert tracking.get_run(tags["rlhf.resumes_run"]).info.status == "KILLED"  # the killed process's run
    print(f"{stage}: resumed from step {pointer.resumed_from_step} of {last}")
    assert_same_weights(result, reference, stage)


class Crash(RuntimeError):
    """The stand-in for a transient failure (e.g. a lost connection) in the middle of training."""


class LoggerThatFailsAt:
    """Forwards metrics to the stage's logger; at step `step` runs `action` (raise, hang) instead."""

    def __init__(self, logger, step: int, action: Callable[[], None]) -> None:
        self.logger, self.step, self.action = logger, step, action

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.step:
            self.action()
        self.logger.log_metrics(metrics, step)

    def __getattr__(self, name: str):
        return getattr(self.logger, name)


def fail_first_call(monkeypatch: pytest.MonkeyPatch, module, name: str, action: Callable[[], None]) -> list[int]:
    """Patch `module.name` (a trainer as the task imported it): its first call gets a `logger` that runs
    `action` at step 3 (after the step-2 checkpoint); later calls run unchanged. Returns the call log."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            return real(*args, **kwargs)
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.arguments["logger"] = LoggerThatFailsAt(bound.arguments["logger"], 3, action)
        return real(*bound.args, **bound.kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _task_runs(flow_run_id: str, name: str) -> list:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        found = [r for r in runs if r.name.rsplit("-", 1)[0] == name]
        return [(r, client.read_task_run_states(r.id)) for r in found]


def test_a_failed_sft_task_is_retried_by_prefect_and_resumes_from_its_checkpoint(
    root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = root.reference("sft")

    def crash() -> None:
        raise Crash("connection lost at step 3")

    # Given SFT failing once at step 3 (after its step-2 checkpoint), and one retry allowed.
    calls = fail_first_call(monkeypatch, tasks.sft, "train_sft", crash)

    # When the pipeline runs.
    result = rlhf_pipeline(str(root.configs["flaky"]), [*OVERRIDES["sft"], "prefect.stages.sft.retries=1"])

    # Then one SFT task run, run twice by Prefect: failed, retried, completed.
    assert len(calls) == 2
    [(task_run, states)] = _task_runs(result.flow_run_id, "sft")
    assert task_run.run_count == 2 and task_run.state.is_completed()
    names = [s.name for s in states]
    assert "Retrying" in names and names[-1] == "Completed"
    # The retry resumed from the step-2 checkpoint and ended with the uninterrupted run's weights.
    pointer = result.stages["sft"]
    assert pointer.resumed_from_step == 2 and pointer.cache_key == reference.stages["sft"].cache_key
    tracking = rlhf_client(result)
    assert tracking.get_run(pointer.run_id).data.tags["rlhf.resumed_from_step"] == "2"
    failed = [
        r
        for r in tracking.search_runs([result.experiment_id], "tags.rlhf.stage = 'sft'")
        if r.info.run_id != pointer.run_id
    ]
    assert [r.info.status for r in failed] == ["FAILED"]
    assert_same_weights(result, reference, "sft")


TIMEOUT_S = 20.0


def test_a_ppo_task_past_its_timeout_is_stopped_and_the_next_run_resumes_it(
    root: Root, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = root.reference("ppo")
    overrides = [*OVERRIDES["ppo"], f"prefect.stages.ppo.timeout_seconds={TIMEOUT_S}"]
    hung: list[bool] = []

    def hang() -> None:  # a stuck call (e.g. an unreachable tracking server); short sleeps: any thread can stop it
        hung.append(threading.current_thread() is threading.main_thread())
        end = time.monotonic() + 10 * TIMEOUT_S
        while time.monotonic() < end:
            time.sleep(0.05)
        raise AssertionError("the timeout did not stop the task")

    # Given PPO hanging at iteration 3 (after its step-2 checkpoint) under a per-stage timeout.
    calls = fail_first_call(monkeypatch, tasks.ppo, "train_ppo", hang)

    # When the pipeline runs, it fails: the PPO task timed out.
    started = time.monotonic()
    state = rlhf_pipeline(str(root.configs["flaky"]), overrides, return_state=True)
    elapsed = time.monotonic() - started

    # Stopped by SIGALRM in the main thread (Prefect's AlarmCancelScope), not by a watcher thread.
    assert hung == [True] and state.is_failed()
    assert TIMEOUT_S <= elapsed < 5 * TIMEOUT_S
    [(task_run, _)] = _task_runs(state.state_details.flow_run_id, "ppo")
    assert task_run.state.name == "TimedOut"
    assert root.checkpoints("flaky", "ppo")

    # When it runs again (same config, same timeout): PPO resumes from step 2 and ends with the reference weights.
    result = rlhf_pipeline(str(root.configs["flaky"]), overrides)

    assert len(calls) == 2
    assert result.executed() == ["ppo"]
    assert result.stages["ppo"].resumed_from_step == 2
    assert result.stages["ppo"].cache_key == reference.stages["ppo"].cache_key
    tracking = rlhf_client(result)
    stopped = [
        r
        for r in tracking.search_runs([result.experiment_id], "tags.rlhf.stage = 'ppo'")
        if r.info.run_id != result.stages["ppo"].run_id
    ]
    assert [r.info.status for r in stopped] == ["FAILED"]
    assert_same_weights(result, reference, "ppo")
