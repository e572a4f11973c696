"""bf16 on the CPU: every stage trains under `mixed_precision: bf16` (torch's CPU autocast, through accelerate) and
follows the float32 loss curve within a stated tolerance; PPO's π_old comes from the same bf16 forward pass the
updates run, so its first update sees ratio 1 and KL 0 exactly (docs/pitfalls.md §1).

Tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4%), but the master weights, the optimizer and
every log-softmax stay float32, so over a few steps the curves differ by far less: ≤ 2% relative here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf_core.callbacks import ListLogger
from rlhf_core.trainers.dpo import DPOConfig, train_dpo
from rlhf_core.trainers.ppo import PPOConfig, train_ppo
from rlhf_core.trainers.reward import RewardConfig, train_reward_model
from rlhf_core.trainers.sft import SFTConfig, train_sft

REL = 0.02
COMMON = {"max_steps": 6, "batch_size": 8, "progress_bar": False, "max_prompt_len": None}
DEMOS = [
    {"prompt": f"Where is order {i}?", "response": f"Order {i} ships tomorrow, sorry for the wait."} for i in range(24)
]
PAIRS = [
    {
        "prompt": f"Hello, order {i} is late.",
        "chosen": f"I am sorry, I will fix order {i} today.",
        "rejected": "Go away.",
    }
    for i in range(24)
]
PROMPTS = [{"prompt": f"Hello, order {i} is late."} for i in range(16)]
GOLD = "rlhf_core.support_bot:gold_score"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _curves(train, metric: str, tmp_path: Path) -> dict[str, list[float]]:
    curves = {}
    for precision in ("no", "bf16"):
        logger = ListLogger()
        train(precision, tmp_path / precision, logger)
        curves[precision] = logger.series(metric)
    return curves


STAGES = {
    "sft": (
        "sft/loss",
        lambda mp, out, log, base: train_sft(
            SFTConfig(**COMMON, learning_rate=3e-3, mixed_precision=mp, max_response_len=None),
            base,
            DEMOS,
            [],
            out,
            log,
        ),
    ),
    "rm": (
        "rm/loss",
        lambda mp, out, log, base: train_reward_model(
            RewardConfig(**COMMON, learning_rate=1e-3, mixed_precision=mp, max_response_len=None),
            base,
            PAIRS,
            [],
            out,
            log,
        ),
    ),
    "dpo": (
        "dpo/loss",
        lambda mp, out, log, base: train_dpo(
            DPOConfig(**COMMON, learning_rate=1e-3, mixed_precision=mp, max_response_len=None),
            base,
            PAIRS,
            [],
            out,
            log,
        ),
    ),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_supervised_stage_in_bf16_follows_the_float32_loss_curve(stage, tiny_model_dir, tmp_path):
    metric, train = STAGES[stage]
    curves = _curves(lambda mp, out, log: train(mp, out, log, tiny_model_dir), metric, tmp_path)
    assert len(curves["bf16"]) == COMMON["max_steps"]
    assert curves["bf16"] == pytest.approx(curves["no"], rel=REL)
    assert curves["bf16"][-1] < curves["bf16"][0]  # and it trained
    # bf16 really ran: the curves are close, not identical
    assert curves["bf16"] != curves["no"]


def test_ppo_in_bf16_starts_at_ratio_one_and_kl_zero_and_follows_float32(tiny_model_dir, tmp_path):
    def train(mp, out, log):
        config = PPOConfig(
            max_steps=3,
            batch_size=8,
            rollout_batch_size=8,
            ppo_epochs=1,
            max_new_tokens=12,
            missing_eos_score=None,
            learning_rate=1e-3,
            progress_bar=False,
            mixed_precision=mp,
            value_warmup_iterations=0,
            reward_model_weight=0,
            reward_functions={GOLD: 1.0},
            dead_signal="warn",
            max_prompt_len=None,
        )
        train_ppo(config, tiny_model_dir, None, PROMPTS, out, log)

    loggers = {}
    for precision in ("no", "bf16"):
        loggers[precision] = ListLogger()
        train(precision, tmp_path / precision, loggers[precision])
    bf16 = loggers["bf16"]
    # The first iteration's policy is the reference and π_old is the updates' own bf16 forward: both exact.
    assert bf16.series("ppo/kl")[0] == 0.0
    assert bf16.series("ppo/ratio_mean")[0] == pytest.approx(1.0, abs=1e-6)
    assert bf16.series("ppo/approx_kl")[0] == pytest.approx(0.0, abs=1e-7)
    # Same samples (same seeds) and scores as float32 at the first iteration, close policy losses after.
    assert bf16.series("ppo/score_mean")[0] == loggers["no"].series("ppo/score_mean")[0]
    assert bf16.series("ppo/policy_loss") == pytest.approx(loggers["no"].series("ppo/policy_loss"), abs=0.05)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_rl_in_bf16_starts_at_ratio_one_and_kl_zero(algorithm, tiny_model_dir, tmp_path):
    from rlhf_core.trainers.grpo import GRPOConfig, train_grpo

    logger = ListLogger()
    config = GRPOConfig(
        algorithm=algorithm,
        max_steps=2,
        batch_size=8,
        prompts_per_iteration=2,
        num_samples_per_prompt=4,
        max_new_tokens=12,
        missing_eos_score=None,
        learning_rate=1e-3,
        progress_bar=False,
        mixed_precision="bf16",
        reward_model_weight=0,
        reward_functions={GOLD: 1.0},
        dead_signal="warn",
        max_prompt_len=None,
    )
    train_grpo(config, tiny_model_dir, None, PROMPTS, tmp_path, logger)
    assert logger.series(f"{algorithm}/kl")[0] == 0.0
    assert logger.series(f"{algorithm}/approx_kl")[0] == pytest.approx(0.0, abs=1e-7)
    assert all(math.isfinite(v) for v in logger.series(f"{algorithm}/loss"))
