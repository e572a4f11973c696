"""The Ray launcher of a stage: a Ray Train job whose N workers each run `rlhf_core.launch_worker` on one spec.

    python -m tasks.ray_driver LAUNCH_DIR/spec.json --processes 2 --address 127.0.0.1:6379 [--gpus-per-process 1]

`tasks/launch.py` starts it as a subprocess, exactly like `accelerate launch`: its output is the stage's launch
log, its exit status the launch's outcome, and stopping its process group stops the job (Ray ends a job's
workers when its driver goes). Ray Train's `TorchTrainer` places the workers (one CPU, or `--gpus-per-process`
GPUs, each), joins them into one torch process group (gloo on CPU, nccl on GPUs) and sets RANK / WORLD_SIZE /
MASTER_ADDR, which the trainers' accelerate setup picks up. The spec's directories must be on a filesystem every
Ray node sees (checkpoints, the final model, rank 0's metrics).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Environment the workers need (the launching task's PYTHONPATH, thread limits, the parent pid to watch).
FORWARDED_ENV = (
    "PYTHONPATH",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "RLHF_LAUNCH_PARENT_PID",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
)


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function: one rank of the stage."""
    from rlhf_core.launch_worker import run_rank

    run_rank(loop_config["spec"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--address", default="auto")
    parser.add_argument("--gpus-per-process", type=float, default=0.0)
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = Path(args.spec).resolve()
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    ray.init(address=args.address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    use_gpu = args.gpus_per_process > 0
    resources = {"CPU": 1, **({"GPU": args.gpus_per_process} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": str(spec)},
        scaling_config=ScalingConfig(num_workers=args.processes, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # Ray Train's own run state (no checkpoints of ours: the trainers write theirs into the stage dir).
        run_config=RunConfig(name=f"rlhf-{spec.parent.parent.name}", storage_path=str(spec.parent / "ray")),
    )
    trainer.fit()  # raises when a worker failed; the exit status then tells the task


if __name__ == "__main__":
    main()
