"""Run a stage's trainer where `launch` says: in this process, on N processes (`accelerate launch`), or on a Ray
cluster — with the same stage contract (one MLflow run written here, cache key, resume, clear failure).

    result = train_launched(env, "sft", train_sft, config, base.model_dir, train_rows, eval_rows, run)

Out of process, every rank runs `rlhf_core.launch_worker` on a spec written into `<stage dir>/launch/`. The
launcher is a subprocess in its own process group (`accelerate launch`, or `tasks.ray_driver` for Ray) whose
output goes to `launch/launch.log` and is echoed to this process's stderr (the trainers' progress lines); rank
0's metrics arrive as JSON lines in `launch/metrics.jsonl`, which this loop forwards to the stage's MLflow logger
as they come. Workers never touch MLflow.

When this task stops (Prefect timeout, Ctrl-C, an error) the launcher's process group is terminated, then
killed. When this process (or the launcher) is SIGKILLed the ranks notice within a second and exit
(`rlhf_core.launch_worker`), so the next run resumes the stage from its newest checkpoint with no stray rank still
writing into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rlhf_core
from rlhf_core.launch_worker import METRICS_FILE, PARENT_PID_ENV, RESULT_FILE, LaunchSpec
from rlhf_core.trainers.config import TrainerConfig, TrainResult

if TYPE_CHECKING:
    from schemas.config import StageLaunchSettings
    from tasks.runner import StageEnv, StageRun

LAUNCH_DIRNAME = "launch"
LOG_FILE = "launch.log"
TAIL_LINES = 30
STOP_GRACE_S = 10.0


class LaunchError(RuntimeError):
    """A launched stage failed: which stage, which rank, and the end of its log."""


def in_process(settings: StageLaunchSettings) -> bool:
    """True when the trainer runs inside the task's own process (accelerate backend, 1 process)."""
    return settings.backend == "accelerate" and (settings.processes or 1) == 1 and settings.config_file is None


def launch_key(settings: StageLaunchSettings) -> dict[str, Any] | None:
    """What of the launch enters the stage's cache key (None in process, so default keys stay as they were).

    The number of processes changes the global batch (`batch_size` is per process) and, even at an equal global
    batch, the order of float reductions; the backend and an accelerate config file (FSDP, DeepSpeed, mixed
    precision) change how the update is computed. All of them enter the key: a stage is reused or resumed only
    under the launch it was trained with. `ray_address` stays out: where a stage runs is not what it computes.
    """
    if in_process(settings):
        return None
    config_digest = None
    if settings.config_file is not None:
        if not Path(settings.config_file).is_file():
            raise LaunchError(
                f"launch.config_file {settings.config_file}: no such file (relative paths are relative to {Path.cwd()})"
            )
        config_digest = "sha256:" + hashlib.sha256(Path(settings.config_file).read_bytes()).hexdigest()
    return {
        "backend": settings.backend,
        "processes": settings.processes,
        "gpus_per_process": settings.gpus_per_process if settings.backend == "ray" else None,
        "config_file_digest": config_digest,
    }


def stage_key_config(config: TrainerConfig, settings: StageLaunchSettings) -> TrainerConfig | dict[str, Any]:
    """The `stage_config` a task hands `run_stage`: the trainer config, plus `launch` when out of process (it
    enters the cache key and the stage run's params, `<stage>.launch.processes`, …)."""
    key = launch_key(settings)
    return config if key is None else {**asdict(config), "launch": key}


def train_launched(
    env: StageEnv,
    stage: str,
    train: Callable[..., TrainResult],
    config: TrainerConfig,
    model_path: str | Path,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    run: StageRun,
) -> TrainResult:
    """Train `stage` as `env.config.launch` says, logging to `run.logger`; returns the trainer's result.

    `train` is the stage's trainer as the task imported it, called here when the stage runs in process; the
    ranks of a launch call the same function, found by stage name (`rlhf_core.launch_worker.trainers`)."""
    settings = env.config.launch.for_stage(stage)
    if in_process(settings):
        return train(config, model_path, train_rows, eval_rows, run.output_dir, run.logger)
    launch_dir = run.output_dir.parent / LAUNCH_DIRNAME
    # A killed earlier try left its metrics, pids and errors: they belong to that try, not this one.
    shutil.rmtree(launch_dir, ignore_errors=True)
    launch_dir.mkdir(parents=True)
    spec = LaunchSpec(
        trainer=stage,
        config=asdict(config),
        model_path=str(model_path),
        train_rows=str(_write_jsonl(launch_dir / "train.jsonl", train_rows)),
        eval_rows=str(_write_jsonl(launch_dir / "eval.jsonl", eval_rows)),
        output_dir=str(run.output_dir),
        launch_dir=str(launch_dir),
    )
    command = launcher_command(settings, spec.write())
    _supervise(stage, settings, command, launch_dir, run)
    return _read_result(stage, settings, launch_dir)


def launcher_command(settings: StageLaunchSettings, spec_path: Path) -> list[str]:
    """The launcher's argv: `accelerate launch … -m rlhf_core.launch_worker SPEC`, or the Ray driver."""
    processes = str(settings.processes or 1)
    if settings.backend == "ray":
        return [
            sys.executable,
            "-m",
            "tasks.ray_driver",
            str(spec_path),
            "--processes",
            processes,
            "--address",
            settings.ray_address or "auto",
            "--gpus-per-process",
            str(settings.gpus_per_process or 0),
        ]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", processes]
    if settings.config_file is not None:
        command += ["--config_file", str(Path(settings.config_file).resolve())]
    else:
        # `--multi_gpu` is accelerate's torchrun launcher (without it, N CPU processes would be one process); on
        # a machine without GPUs the trainers' Accelerator(cpu=True) joins the ranks with gloo. One machine; a
        # free port, so two launched stages (or pipelines) never collide.
        command += [
            "--multi_gpu",
            "--num_machines",
            "1",
            "--main_process_port",
            str(_free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    return [*command, "-m", "rlhf_core.launch_worker", str(spec_path)]


def launch_env() -> dict[str, str]:
    """This environment, plus: the ranks import the same `rlhf_core` as this process, and know its pid."""
    env = dict(os.environ)
    source_root = str(Path(rlhf_core.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    env[PARENT_PID_ENV] = f"{socket.gethostname()}:{os.getpid()}"
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on one machine: no oversubscription of its cores
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():  # `rlhf run` turned transformers' bars off: in the ranks too
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


def _supervise(stage: str, settings: StageLaunchSettings, command: list[str], launch_dir: Path, run: StageRun) -> None:
    """Run the launcher to its end, forwarding metrics and output; stop its process group if we stop."""
    log_path = launch_dir / LOG_FILE
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=launch_env(),
            cwd=Path.cwd(),
            start_new_session=True,
        )
    metrics, output = _Tail(launch_dir / METRICS_FILE), _Tail(log_path)
    try:
        while True:
            done = proc.poll() is not None
            for line in metrics.lines():  # rank 0's metrics → MLflow, as they come
                record = json.loads(line)
                run.logger.log_metrics(record["metrics"], record["step"])
            for line in output.lines():
                sys.stderr.write(line + "\n")
            if done:
                break
            time.sleep(0.2)
    finally:
        _stop_group(proc)
    if proc.returncode != 0:
        raise LaunchError(failure_message(stage, settings, launch_dir, proc.returncode, output.tail))


def failure_message(
    stage: str, settings: StageLaunchSettings, launch_dir: Path, returncode: int, tail: Sequence[str]
) -> str:
    """`stage sft failed on 2 processes (accelerate, exit code 1): rank 1 was killed by SIGKILL` (or `rank 1
    raised ValueError: …` and the end of its traceback), then the end of the launcher's log.

    The rank to blame is torchrun's root cause (the first rank that failed: the others then fail too, on a
    closed connection, or are stopped by the launcher); without one (Ray), the lowest rank that wrote an error."""
    head = f"stage {stage} failed on {settings.processes} processes ({settings.backend}, exit code {returncode})"
    log_tail = f"--- last lines of {launch_dir / LOG_FILE} ---\n" + "\n".join(tail)
    rank, code = _root_cause(launch_dir / LOG_FILE)
    errors = {int(p.stem.split("-", 1)[1]): p for p in launch_dir.glob("rank-*.error")}
    if rank is None and errors:
        rank = min(errors)
    if rank in errors:
        lines = errors[rank].read_text().rstrip().splitlines()
        return f"{head}: rank {rank} raised {lines[-1]}\n" + "\n".join(lines[-TAIL_LINES:]) + "\n" + log_tail
    if rank is not None and code is not None:
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if -code in set(signal.Signals)
            else f"exited with code {code}"
        )
        head += f": rank {rank} {how}"
    return f"{head}\n{log_tail}"


def _root_cause(log_path: Path) -> tuple[int | None, int | None]:
    """(rank, exit code) of torchrun's "Root Cause (first observed failure)" in the launch log, or (None, None)."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None, None
    _, found, cause = text.rpartition("Root Cause")
    match = re.search(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", cause) if found else None
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def _read_result(stage: str, settings: StageLaunchSettings, launch_dir: Path) -> TrainResult:
    try:
        data = json.loads((launch_dir / RESULT_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise LaunchError(f"stage {stage}: the launch ended without rank 0's result ({exc})") from None
    if data["world_size"] != settings.processes:  # e.g. a launcher that started N separate single processes
        raise LaunchError(
            f"stage {stage}: asked for {settings.processes} processes, but rank 0 trained in a process "
            f"group of {data['world_size']}; check the launcher (log: {launch_dir / LOG_FILE})"
        )
    return TrainResult(
        model_dir=Path(data["model_dir"]), metrics=data["metrics"], resumed_from_step=data["resumed_from_step"]
    )


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's process group (the launcher passes it to its ranks), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # ranks that outlived their launcher
            os.killpg(proc.pid, signal.SIGKILL)
        return


class _Tail:
    """New complete lines of a growing file, and the last `TAIL_LINES` of them."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *complete, self.partial = (self.partial + chunk).split(b"\n")
        out = [line.decode(errors="replace") for line in complete]
        self.tail.extend(out)
        return out


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
