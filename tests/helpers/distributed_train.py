"""Entry script of `tests/test_distributed.py`: SFT, then DPO from the SFT model, under a launcher.

    torchrun --standalone --nproc_per_node 2 tests/helpers/distributed_train.py SPEC.json

SPEC.json holds `model_path`, `output_dir`, `demonstrations`, `eval_demonstrations`, `preferences`,
`eval_preferences` (row lists), `sft_config` and `dpo_config` (keyword arguments of `SFTConfig` /
`DPOConfig`). The main process writes every logged `(step, metrics)` of both stages and the world size to
`output_dir/metrics.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from rlhf_core.callbacks import ListLogger
from rlhf_core.launch_worker import leave_process_group
from rlhf_core.trainers.dpo import DPOConfig, train_dpo
from rlhf_core.trainers.sft import SFTConfig, train_sft


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["output_dir"])
    sft_logger, dpo_logger = ListLogger(), ListLogger()
    sft = train_sft(
        SFTConfig(**spec["sft_config"]),
        spec["model_path"],
        spec["demonstrations"],
        spec["eval_demonstrations"],
        out / "sft",
        sft_logger,
    )
    train_dpo(
        DPOConfig(**spec["dpo_config"]),
        sft.model_dir,
        spec["preferences"],
        spec["eval_preferences"],
        out / "dpo",
        dpo_logger,
    )
    if dist.get_rank() == 0:  # only the main process logs
        metrics = {"world_size": dist.get_world_size(), "sft": sft_logger.records, "dpo": dpo_logger.records}
        (out / "metrics.json").write_text(json.dumps(metrics))
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
