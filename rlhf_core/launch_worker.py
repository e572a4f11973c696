"""One process of a stage trained on several processes: what `accelerate launch` / `torchrun` (or a Ray Train
worker) runs on every rank.

    python -m accelerate.commands.launch --num_processes 2 -m rlhf_core.launch_worker LAUNCH_DIR/spec.json

`spec.json` (written by the pipeline's task, `tasks/launch.py`) names the trainer, its config (the fields of its
config dataclass), the model to start from, the training and held-out rows (JSON lines files) and the trainer's
`output_dir`. Every rank runs the same trainer call; the trainer's accelerate setup joins the ranks into one
process group and shards each global batch (the data order is seeded, so every rank agrees on it).

What comes back, in the spec's `launch_dir` (a shared filesystem when the ranks are on several machines):

    metrics.jsonl     rank 0 only: one `{"step": N, "metrics": {...}}` line per `log_metrics` call, flushed at
                      once, which the task tails and forwards to MLflow (workers never write MLflow)
    result.json       rank 0 only, written atomically when training ended: model_dir, metrics, resumed_from_step,
                      world_size (the size of the process group it trained in)
    rank-<r>.pid      each rank's process id (so a test, or an operator, can find a worker)
    rank-<r>.error    the traceback of a rank that raised, for the task's error message

A worker exits by itself within a second when the task process that launched it is gone
(`RLHF_LAUNCH_PARENT_PID`, `host:pid`, watched on that host only) or its launcher is: a SIGKILLed pipeline must
not leave ranks training, and writing checkpoints, into a stage directory its next run resumes from.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rlhf_core.atomic import atomic_write_text
from rlhf_core.trainers.config import LoRAConfig, TrainerConfig, TrainResult

PARENT_PID_ENV = "RLHF_LAUNCH_PARENT_PID"
SPEC_FILE, METRICS_FILE, RESULT_FILE = "spec.json", "metrics.jsonl", "result.json"


def trainers() -> dict[str, tuple[type[TrainerConfig], Callable[..., TrainResult]]]:
    """Stage name → (config dataclass, `train_<stage>(config, model_path, train_rows, eval_rows, output_dir,
    logger)`): the stages that can run on several processes."""
    from rlhf_core.trainers.dpo import DPOConfig, train_dpo
    from rlhf_core.trainers.reward import RewardConfig, train_reward_model
    from rlhf_core.trainers.sft import SFTConfig, train_sft

    return {
        "sft": (SFTConfig, train_sft),
        "reward_model": (RewardConfig, train_reward_model),
        "dpo": (DPOConfig, train_dpo),
    }


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a rank needs to run one stage's trainer (JSON in `launch_dir/spec.json`)."""

    trainer: str
    """Key of `trainers()`: sft, reward_model or dpo."""
    config: dict[str, Any]
    """The trainer config's fields (`dataclasses.asdict`), every "auto" length already resolved."""
    model_path: str
    """The model the stage starts from (base model for SFT, the SFT model for RM and DPO)."""
    train_rows: str
    """JSON lines file of the training rows."""
    eval_rows: str
    """JSON lines file of the held-out rows (may be empty)."""
    output_dir: str
    """The trainer's output_dir: checkpoints/ and model/ (a resumed launch finds its checkpoints here)."""
    launch_dir: str
    """Where the ranks report back (metrics.jsonl, result.json, rank-<r>.pid/.error)."""

    def write(self) -> Path:
        path = Path(self.launch_dir) / SPEC_FILE
        atomic_write_text(path, json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, path: str | Path) -> LaunchSpec:
        return cls(**json.loads(Path(path).read_text()))


def config_from_dict(cls: type[TrainerConfig], data: dict[str, Any]) -> TrainerConfig:
    """The config dataclass back from its JSON form (`lora` is the one nested dataclass; JSON has no tuples)."""
    values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    if values.get("lora") is not None:
        lora = dict(values["lora"])
        lora["target_modules"] = tuple(lora["target_modules"])
        values["lora"] = LoRAConfig(**lora)
    return cls(**values)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


class JsonLinesLogger:
    """`MetricLogger` writing one JSON line per call, flushed at once (the task tails the file)."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a", buffering=1)  # noqa: SIM115 — open for the whole run, closed in `close`

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.handle.write(json.dumps({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def rank() -> int:
    """This process's global rank (0 outside a launcher)."""
    return int(os.environ.get("RANK", "0"))


def run_spec(spec: LaunchSpec) -> TrainResult:
    """Run the spec's trainer on this rank; rank 0 streams metrics and writes `result.json`."""
    config_cls, train = trainers()[spec.trainer]
    config = config_from_dict(config_cls, spec.config)
    launch_dir = Path(spec.launch_dir)
    logger = JsonLinesLogger(launch_dir / METRICS_FILE) if rank() == 0 else None
    try:
        result = train(
            config, spec.model_path, read_jsonl(spec.train_rows), read_jsonl(spec.eval_rows), spec.output_dir, logger
        )
    finally:
        if logger is not None:
            logger.close()
    if rank() == 0:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        atomic_write_text(
            launch_dir / RESULT_FILE,
            json.dumps(
                {
                    "model_dir": str(result.model_dir),
                    "metrics": result.metrics,
                    "resumed_from_step": result.resumed_from_step,
                    "world_size": world_size,
                }
            ),
        )
    return result


def _exit_with_parents(task_pid: int | None, interval_s: float = 0.05) -> None:
    """Daemon thread: end this process (no cleanup: nothing of it is wanted) once the launching task
    (`task_pid`, on this host) is gone, or once this process's own parent (the launcher) is gone — torchrun
    starts each rank in a session of its own, so a killed launcher's process group does not include them. Checked
    every 50 ms (one `kill(pid, 0)`, negligible): a small model trains several steps, and checkpoints, in 0.5 s."""
    launcher = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != launcher:  # re-parented: the launcher died
                os._exit(3)
            if task_pid is None:
                continue
            try:
                os.kill(task_pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:  # alive, owned by another user
                continue

    threading.Thread(target=watch, name="exit-with-parents", daemon=True).start()


def run_rank(spec_path: str | Path) -> None:
    """One rank: record its pid, watch the launching task, run the spec; a raised error is written to
    `rank-<r>.error` before it propagates (the launcher then stops the other ranks)."""
    spec = LaunchSpec.read(spec_path)
    launch_dir = Path(spec.launch_dir)
    (launch_dir / f"rank-{rank()}.pid").write_text(str(os.getpid()))
    host, _, pid = os.environ.get(PARENT_PID_ENV, "").rpartition(":")
    # A pid means nothing on another machine (a Ray cluster).
    _exit_with_parents(int(pid) if pid and host == socket.gethostname() else None)
    try:
        run_spec(spec)
    except BaseException:
        (launch_dir / f"rank-{rank()}.error").write_text(traceback.format_exc())
        raise
    leave_process_group()


def leave_process_group() -> None:
    """Wait for every rank, then tear the process group down. A rank that simply exits while another still uses
    the group can be aborted by gloo's background thread ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(sys.argv[1])
