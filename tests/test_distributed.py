"""Data parallelism: SFT and DPO under `torchrun` with 2 CPU processes (gloo) follow the loss curve of 1
process with the same global batch — the path users take to many GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from rlhf_core.callbacks import ListLogger
from rlhf_core.trainers.common import latest_checkpoint
from rlhf_core.trainers.dpo import DPOConfig, train_dpo
from rlhf_core.trainers.sft import SFTConfig, train_sft

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "helpers" / "distributed_train.py"
ISSUES = ["my parcel is late", "I was charged twice", "the app crashes", "I forgot my password"]


def _demonstrations(n: int) -> list[dict]:
    return [
        {
            "prompt": f"Hello, {ISSUES[i % 4]}. Order {i}." + " Please." * (i % 3),
            "response": f"I am sorry that {ISSUES[i % 4]}. I will fix order {i} today." + " Thanks." * (i % 2),
        }
        for i in range(n)
    ]


def _preferences(n: int) -> list[dict]:
    return [
        {
            "prompt": f"Hello, {ISSUES[i % 4]}. Order {i}.",
            "chosen": f"I am sorry that {ISSUES[i % 4]}. I will fix order {i} today.",
            "rejected": "Not my problem." + " Go away." * (i % 2),
        }
        for i in range(n)
    ]


def _configs(batch_size: int) -> tuple[dict, dict]:
    common = {
        "max_steps": 4,
        "batch_size": batch_size,
        "learning_rate": 2e-3,
        "progress_bar": False,
        "eval_every": 2,
        "warmup_steps": 1,
        "lr_schedule": "linear",
        "checkpoint_every": 2,
    }
    return common, {**common, "dpo_beta": 0.1}


COMPARED = {
    "sft": ("loss", "grad_norm", "learning_rate", "eval_loss"),
    "dpo": ("loss", "grad_norm", "learning_rate", "reward_margin", "eval_loss", "eval_reward_margin"),
}


def _series(records: list, prefix: str) -> dict[str, list[float]]:
    return {n: [m[f"{prefix}/{n}"] for _, m in records if f"{prefix}/{n}" in m] for n in COMPARED[prefix]}


def test_two_processes_follow_the_single_process_loss_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given 12 demonstrations and 12 preference pairs (ragged lengths) and 5 held-out rows each, when SFT
    then DPO run with global batch 4 as 1 process × 4 rows (here) and as 2 gloo processes × 2 rows
    (`torchrun`), then every logged loss, gradient norm, learning rate and held-out metric agrees to float
    tolerance."""
    demos, prefs = _demonstrations(17), _preferences(17)
    sft_kwargs, dpo_kwargs = _configs(batch_size=4)
    sft_logger, dpo_logger = ListLogger(), ListLogger()
    sft = train_sft(
        SFTConfig(**sft_kwargs), tiny_model_dir, demos[:12], demos[12:], tmp_path / "one" / "sft", sft_logger
    )
    train_dpo(DPOConfig(**dpo_kwargs), sft.model_dir, prefs[:12], prefs[12:], tmp_path / "one" / "dpo", dpo_logger)

    sft_kwargs, dpo_kwargs = _configs(batch_size=2)
    spec = {
        "model_path": str(tiny_model_dir),
        "output_dir": str(tmp_path / "two"),
        "demonstrations": demos[:12],
        "eval_demonstrations": demos[12:],
        "preferences": prefs[:12],
        "eval_preferences": prefs[12:],
        "sft_config": sft_kwargs,
        "dpo_config": dpo_kwargs,
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ENTRY),
        str(spec_path),
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2

    for prefix, one_records, two_records in (
        ("sft", sft_logger.records, two["sft"]),
        ("dpo", dpo_logger.records, two["dpo"]),
    ):
        expected, got = _series(one_records, prefix), _series(two_records, prefix)
        assert len(expected["loss"]) == 4 and len(expected["eval_loss"]) == 2
        for name in expected:
            torch.testing.assert_close(
                got[name],
                expected[name],
                atol=1e-5,
                rtol=1e-5,
                msg=f"{prefix}/{name}: {got[name]} vs {expected[name]}",
            )
    assert _series(dpo_logger.records, "dpo")["reward_margin"][-1] > 0
    # Each process saved its own RNG states into the shared checkpoint, and the manifest covers them.
    for stage in ("sft", "dpo"):
        checkpoint = latest_checkpoint(tmp_path / "two" / stage, verify_hashes=True)
        assert checkpoint is not None and checkpoint.name == "step-4"
        listed = json.loads((checkpoint / "manifest.json").read_text())["files"]
        assert {f"rng-{i}.{ext}" for i in (0, 1) for ext in ("json", "safetensors")} <= listed.keys()
        assert not (checkpoint / "rng-2.json").exists()
