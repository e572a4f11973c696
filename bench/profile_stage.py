"""Where one of our trainers spends its time: the torch profiler over a few optimizer steps of a stage.

    python bench/profile_stage.py --stage sft --model smollm2 --steps 4 --batch-size 4

Prints the operators with the most self CPU time (CUDA time on a GPU) and the share of the whole profiled
window spent in forward, backward and the optimizer. The first step is run before profiling starts (warm-up).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from common import ROOT, base_model, initial_reward_model, task_rows
from torch.profiler import ProfilerActivity, profile


class ProfilingLogger:
    """Starts the profiler after the first logged training step and stops it after the last."""

    def __init__(self, stage: str, prof: profile, steps: int) -> None:
        self.stage, self.prof, self.steps, self.started = stage, prof, steps, False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if f"{self.stage}/peak_memory_mb" not in metrics:
            return
        if not self.started:
            self.prof.start()
            self.started = True
        elif step == self.steps:
            self.prof.stop()


def run(stage: str, model: Path, rows: dict, steps: int, batch_size: int, out: Path, logger: ProfilingLogger) -> None:
    if stage == "sft":
        from rlhf_core.trainers.sft import SFTConfig, train_sft

        config = SFTConfig(
            max_steps=steps, batch_size=batch_size, max_prompt_len=None, max_response_len=None, progress_bar=False
        )
        train_sft(config, model, rows["sft"][: steps * batch_size], [], out, logger)
    elif stage == "dpo":
        from rlhf_core.trainers.dpo import DPOConfig, train_dpo

        config = DPOConfig(
            max_steps=steps, batch_size=batch_size, max_prompt_len=None, max_response_len=None, progress_bar=False
        )
        train_dpo(config, model, rows["prefs"][: steps * batch_size], [], out, logger)
    elif stage == "rm":
        from rlhf_core.trainers.reward import RewardConfig, train_reward_model

        config = RewardConfig(
            max_steps=steps, batch_size=batch_size, max_prompt_len=None, max_response_len=None, progress_bar=False
        )
        train_reward_model(config, model, rows["prefs"][: steps * batch_size], [], out, logger)
    else:
        from rlhf_core.trainers.ppo import PPOConfig, train_ppo

        config = PPOConfig(
            max_steps=steps,
            batch_size=batch_size,
            grad_accum_steps=2,
            rollout_batch_size=2 * batch_size,
            ppo_epochs=2,
            max_new_tokens=32,
            critic="separate",
            weak_reward_model="warn",
            progress_bar=False,
            max_prompt_len=None,
        )
        train_ppo(
            config, model, initial_reward_model(model), rows["prompts"], out, logger, reward_model_eval_accuracy=1.0
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["sft", "rm", "dpo", "ppo"], default="sft")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", default=str(ROOT / "data" / "support_bot"))
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, record_shapes=True)
    logger = ProfilingLogger(args.stage, prof, args.steps)
    out = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    try:
        run(args.stage, base_model(args.model), task_rows(Path(args.data)), args.steps, args.batch_size, out, logger)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=12))


if __name__ == "__main__":
    main()
