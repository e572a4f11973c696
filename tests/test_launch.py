"""Stages on several processes, launched by the pipeline itself (`launch:` in the config, `tasks/launch.py`).

Given the tiny test pipeline (validate → sft → dpo, `test_pipeline.pipeline_config`) with a global batch of 4:
- when it runs as 1 process × batch 4 (the trainer inside the task's process), as 2 processes × batch 2 with
  `accelerate launch`, and as 2 Ray Train workers × batch 2 on a local Ray cluster the test starts
  (`ray start --head` on 127.0.0.1, 2 CPUs, gloo), then the SFT and DPO curves each stage run holds in MLflow
  agree within 1e-4 (loss, gradient norm, learning rate, held-out metrics), each stage wrote one MLflow run
  (the task's; no rank writes MLflow) with its launch as params, and the launch is part of its cache key;
- when one rank of a 2-process SFT is SIGKILLed mid-stage, then the pipeline fails with an error naming the
  stage and the rank, the stage has no pointer (not complete) and its MLflow run is FAILED;
- when a real pipeline process (`python -m flows.pipeline`) is SIGKILLed with its process group once that
  2-process SFT wrote a checkpoint, then no rank survives it (the launcher has a group of its own: the ranks
  watch the task's process), and the next run resumes SFT from that checkpoint and ends with the weights of the
  uninterrupted 2-process run.

The tests share one module's work dirs and run in file order.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from helpers.required import skip_unless_ci
from mlflow import MlflowClient
from safetensors.torch import load_file
from test_deployment import free_port
from test_pipeline import REPO, pipeline_config

from flows.pipeline import PipelineResult, rlhf_pipeline

pytestmark = pytest.mark.slow

SFT_STEPS, DPO_STEPS, GLOBAL_BATCH = 12, 4, 4
ONLY_SFT = ["stages=[validate, sft]"]
CURVES = {
    "sft": ("loss", "grad_norm", "learning_rate", "eval_loss"),
    "dpo": ("loss", "grad_norm", "learning_rate", "reward_margin", "eval_loss", "eval_reward_margin"),
}


def launch_config(root: Path, work: str, launch: dict) -> Path:
    """The test pipeline (validate, sft, dpo) under `root/work`, with `launch` and a per-process batch that keeps
    the global batch at `GLOBAL_BATCH`."""
    config = pipeline_config(root)
    processes = launch.get("processes", 1)
    common = {"batch_size": GLOBAL_BATCH // processes, "checkpoint_every": 2}
    config |= {
        "work_dir": str(root / work),
        "stages": ["validate", "sft", "dpo"],
        "launch": launch,
        "sft": {**config["sft"], **common, "max_steps": SFT_STEPS, "eval_every": 4},
        "dpo": {**config["dpo"], **common, "max_steps": DPO_STEPS, "eval_every": 2},
    }
    path = root / f"{work}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def clean_env(prefect_api: str) -> dict[str, str]:
    # Without the MLFLOW_*_URI an in-process pipeline left in this environment: a subprocess logs to its config's
    # own store. One intra-op thread per process, as in this one (tests/conftest.py).
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    return env | {"PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def one_process(root: Path) -> PipelineResult:
    """The reference: 1 process × batch 4, the trainers inside the tasks' process."""
    return rlhf_pipeline(str(launch_config(root, "one", {})))


@pytest.fixture(scope="module")
def two_processes(root: Path) -> PipelineResult:
    """2 processes × batch 2 with `accelerate launch`."""
    return rlhf_pipeline(str(launch_config(root, "two", {"processes": 2})))


@pytest.fixture(scope="module")
def ray_cluster(root: Path) -> Iterator[str]:
    """A local Ray cluster: `ray start --head --block` on 127.0.0.1 with 2 CPUs, in its own process group, which
    is terminated (then killed) at the end; yields its address."""
    try:
        import ray  # noqa: F401
    except ImportError:
        skip_unless_ci("ray is not installed (pip install -e '.[ray]')")
    port = free_port()
    address = f"127.0.0.1:{port}"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # Ray's unix sockets live under --temp-dir, whose path must stay short (107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    command = [
        ray_cli,
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--node-ip-address",
        "127.0.0.1",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--object-store-memory",
        str(100 * 2**20),
        "--temp-dir",
        temp_dir,
    ]
    with open(root / "ray.log", "wb") as log:
        head = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([ray_cli, "status", "--address", address], capture_output=True).returncode != 0:
            assert head.poll() is None, (root / "ray.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address
    finally:
        stop_group(head)


def stop_group(head: subprocess.Popen) -> None:
    """SIGTERM the process group `head` leads (`ray start --block` stops its cluster on it), give it time, then
    SIGKILL whatever of the group is left (the GCS server may ignore the SIGTERM)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)
    deadline = time.monotonic() + 5
    while group_alive(head.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


def group_alive(pgid: int) -> bool:
    """A live (non-zombie) process of group `pgid` exists."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def curves(result: PipelineResult, stage: str) -> dict[str, list[float]]:
    """Every compared metric of the stage's MLflow run, in step order."""
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run_id = result.stages[stage].run_id
    return {
        name: [m.value for m in sorted(client.get_metric_history(run_id, f"{stage}/{name}"), key=lambda m: m.step)]
        for name in CURVES[stage]
    }


def assert_same_curves(result: PipelineResult, reference: PipelineResult) -> None:
    for stage in ("sft", "dpo"):
        expected, got = curves(reference, stage), curves(result, stage)
        assert len(expected["loss"]) == (SFT_STEPS if stage == "sft" else DPO_STEPS)
        for name, values in expected.items():
            assert values, f"{stage}/{name} was not logged"
            torch.testing.assert_close(
                got[name], values, atol=1e-4, rtol=0, msg=lambda m, s=stage, n=name: f"{s}/{n}: {m}"
            )


def assert_one_run_per_stage(result: PipelineResult, backend: str) -> None:
    """Each launched stage: one MLflow run (the task's), with the launch as params; its cache key differs from
    the 1-process one."""
    client = MlflowClient(tracking_uri=result.tracking_uri)
    for stage in ("sft", "dpo"):
        runs = client.search_runs([result.experiment_id], f"tags.rlhf.stage = '{stage}'")
        assert [r.info.run_id for r in runs] == [result.stages[stage].run_id]
        params = runs[0].data.params
        assert params[f"{stage}.launch.processes"] == "2" and params[f"{stage}.launch.backend"] == backend


def test_two_accelerate_processes_follow_the_one_process_curves(
    one_process: PipelineResult, two_processes: PipelineResult
) -> None:
    assert two_processes.executed() == ["validate", "sft", "dpo"]
    assert_same_curves(two_processes, one_process)
    assert_one_run_per_stage(two_processes, "accelerate")
    assert two_processes.stages["sft"].cache_key != one_process.stages["sft"].cache_key


def test_two_ray_workers_follow_the_one_process_curves(
    root: Path, one_process: PipelineResult, ray_cluster: str
) -> None:
    config = launch_config(root, "ray", {"backend": "ray", "processes": 2, "ray_address": ray_cluster})
    result = rlhf_pipeline(str(config))
    assert_same_curves(result, one_process)
    assert_one_run_per_stage(result, "ray")
    # The Ray Train workers were two processes of one gloo group (each rank recorded its pid).
    launch_dir = Path(result.stages["sft"].model_dir).parents[1] / "launch"
    assert sorted(p.name for p in launch_dir.glob("rank-*.pid")) == ["rank-0.pid", "rank-1.pid"]


def sft_checkpoints(root: Path, work: str) -> list[str]:
    return glob.glob(str(root / work / "stages" / "sft-*" / "train" / "checkpoints" / "step-*" / "manifest.json"))


def rank_pids(root: Path, work: str) -> dict[int, int]:
    found = glob.glob(str(root / work / "stages" / "sft-*" / "launch" / "rank-*.pid"))
    return {int(Path(p).stem.split("-")[1]): int(Path(p).read_text()) for p in found}


def newest_checkpoint(root: Path, work: str) -> int:
    """The step of the newest complete SFT checkpoint in `work` (0: none)."""
    return max((int(Path(m).parent.name.split("-")[1]) for m in sft_checkpoints(root, work)), default=0)


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_dead_rank_fails_the_stage_with_its_rank_named(root: Path) -> None:
    config = launch_config(root, "killed", {"processes": 2})
    killed: list[int] = []

    def kill_rank_1() -> None:  # once SFT has a checkpoint: mid-stage
        wait_for(lambda: sft_checkpoints(root, "killed") and 1 in rank_pids(root, "killed"), 240, "a checkpoint")
        pid = rank_pids(root, "killed")[1]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    # Given rank 1 of a 2-process SFT SIGKILLed once the stage has a checkpoint.
    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    state = rlhf_pipeline(str(config), ONLY_SFT, return_state=True)
    killer.join(timeout=5)

    # Then the pipeline failed, naming the stage and the rank.
    assert killed and state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "stage sft failed on 2 processes (accelerate" in message and "rank 1 was killed by SIGKILL" in message
    # The stage is not complete: no pointer, its MLflow run FAILED.
    [stage_dir] = glob.glob(str(root / "killed" / "stages" / "sft-*"))
    assert not (Path(stage_dir) / "pointer.json").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'killed' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("rlhf-test").experiment_id], "tags.rlhf.stage = 'sft'")
    assert run.info.status == "FAILED"


def test_a_killed_two_process_stage_resumes_to_the_uninterrupted_weights(
    root: Path, two_processes: PipelineResult, prefect_api: str
) -> None:
    config = launch_config(root, "killed", {"processes": 2})

    before = newest_checkpoint(root, "killed")  # left by the dead rank's run, if it ran first

    # Given a real pipeline process, SIGKILLed with its process group once its 2-process SFT wrote a checkpoint.
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", str(config), *ONLY_SFT],
        cwd=REPO,
        env=clean_env(prefect_api),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: newest_checkpoint(root, "killed") > before or proc.poll() is not None, 240, "a new SFT checkpoint"
        )
        assert proc.poll() is None, "the pipeline ended before SFT wrote a checkpoint"
        killed_at = newest_checkpoint(root, "killed")
        pids = rank_pids(root, "killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Then no rank outlives the pipeline (they watch the task's process; the launcher had its own group).
    wait_for(lambda: not any(alive(pid) for pid in pids.values()), 5, f"ranks {pids} to exit")

    # When the pipeline runs again, SFT resumes from a checkpoint before its last step.
    result = rlhf_pipeline(str(config), ONLY_SFT)
    pointer = result.stages["sft"]
    assert pointer.cache_key == two_processes.stages["sft"].cache_key
    print(f"SFT killed after its step-{killed_at} checkpoint, resumed from step {pointer.resumed_from_step}")
    assert pointer.resumed_from_step is not None and killed_at <= pointer.resumed_from_step < SFT_STEPS
    tags = MlflowClient(tracking_uri=result.tracking_uri).get_run(pointer.run_id).data.tags
    assert tags["rlhf.resumed_from_step"] == str(pointer.resumed_from_step)

    # And ends with the uninterrupted 2-process run's weights.
    ours = load_file(Path(pointer.model_dir) / "model.safetensors")
    theirs = load_file(Path(two_processes.stages["sft"].model_dir) / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
