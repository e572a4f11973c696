"""PPO and DPO improve the SFT policy by a judge they never computed themselves: the bundled task's gold judge.

One tiny SFT model is trained once (module scope) on the bundled demonstrations, with lengths from the data so
it learns to end its replies. Then:

- PPO with the gold judge as its reward *function* (no reward model at all): PPO's own health, apart from any
  RM. Its samples on held-out prompts beat the SFT model's by the gold judge by ≥ 2 standard errors of the paired
  difference — the judge scores texts decoded and re-sampled by `evaluate_models`, not PPO's rollout numbers.
- GRPO and RLOO with the same reward function, K samples per prompt and no critic: the same criterion.
- DPO on the bundled preference pairs (labelled by that judge, with 10% of labels flipped): the same criterion.
- A PPO whose rollouts are all cut before EOS stops with the reason (the no-EOS penalty makes the reward flat).

Flip PPO's or GRPO/RLOO's advantage sign or DPO's chosen/rejected and these tests fail (the direction reverses).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_core.evaluation import evaluate_models
from rlhf_core.generation import SamplingConfig
from rlhf_core.guards import DeadSignalError
from rlhf_core.support_bot import gold_score
from rlhf_core.trainers.dpo import DPOConfig, train_dpo
from rlhf_core.trainers.grpo import GRPOConfig, train_grpo
from rlhf_core.trainers.ppo import PPOConfig, train_ppo
from rlhf_core.trainers.sft import SFTConfig, train_sft

DATA = Path(__file__).resolve().parents[1] / "data" / "support_bot"
GOLD = "rlhf_core.support_bot:gold_score"
EVAL_PROMPTS = 48
SAMPLING = SamplingConfig(max_new_tokens=120, temperature=0.7, top_p=0.9)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sft_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base fine-tuned on the bundled demonstrations (lengths `auto`: every target keeps its EOS)."""
    config = SFTConfig(
        max_steps=160, batch_size=16, learning_rate=3e-3, warmup_steps=16, lr_schedule="cosine", progress_bar=False
    )
    out = tmp_path_factory.mktemp("sft")
    return train_sft(config, tiny_model_dir, _rows("demonstrations.jsonl"), [], out).model_dir


def _paired_gold_gain(sft: Path, policy: Path) -> tuple[float, float, dict]:
    """Mean gold-score gain of `policy` over `sft` on held-out prompts and its standard error (paired by
    prompt, same sampling seed), plus the policy's metrics."""
    prompts = _rows("prompts_eval.jsonl")[:EVAL_PROMPTS]
    report = evaluate_models(
        {"sft": sft, "policy": policy},
        prompts,
        SAMPLING,
        gold_fn=gold_score,
        reference_model_path=sft,
        baseline="sft",
        seed=1,
        batch_size=16,
    )
    rows = report.samples
    gains = [r["policy/gold_score"] - r["sft/gold_score"] for r in rows]
    # Recomputed from the texts: the gold scores in the table are the judge's on the decoded responses.
    assert rows[0]["policy/gold_score"] == pytest.approx(gold_score(rows[0]["prompt"], rows[0]["policy/response"]))
    mean = sum(gains) / len(gains)
    stderr = math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains))
    return mean, stderr, report.metrics["policy"]


def test_ppo_with_the_gold_judge_as_reward_raises_the_gold_score(sft_model: Path, tmp_path: Path) -> None:
    config = PPOConfig(
        max_steps=12,
        batch_size=8,
        rollout_batch_size=32,
        ppo_epochs=2,
        learning_rate=1e-4,
        kl_coef=0.02,
        max_new_tokens=120,
        reward_model_weight=0.0,
        reward_functions={GOLD: 1.0},
        progress_bar=False,
    )
    result = train_ppo(config, sft_model, None, _rows("prompts_train.jsonl"), tmp_path / "ppo")
    gain, stderr, metrics = _paired_gold_gain(sft_model, result.model_dir)
    assert gain >= 2 * stderr and gain > 0, (gain, stderr, metrics)
    assert metrics["eval/no_eos_fraction"] <= 0.2 and metrics["eval/kl_to_ref"] <= 10.0, metrics


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_with_the_gold_judge_as_reward_raise_the_gold_score(
    sft_model: Path, tmp_path: Path, algorithm: str
) -> None:
    config = GRPOConfig(
        algorithm=algorithm,
        max_steps=12,
        batch_size=8,
        prompts_per_iteration=8,
        num_samples_per_prompt=4,
        epochs=2,
        learning_rate=1e-4,
        kl_coef=0.02,
        max_new_tokens=120,
        reward_model_weight=0.0,
        reward_functions={GOLD: 1.0},
        progress_bar=False,
    )
    result = train_grpo(config, sft_model, None, _rows("prompts_train.jsonl"), tmp_path / algorithm)
    gain, stderr, metrics = _paired_gold_gain(sft_model, result.model_dir)
    assert gain >= 2 * stderr and gain > 0, (gain, stderr, metrics)
    assert metrics["eval/no_eos_fraction"] <= 0.2 and metrics["eval/kl_to_ref"] <= 10.0, metrics


def test_dpo_on_the_bundled_pairs_raises_the_gold_score(sft_model: Path, tmp_path: Path) -> None:
    config = DPOConfig(max_steps=60, batch_size=16, learning_rate=3e-4, dpo_beta=0.1, progress_bar=False)
    result = train_dpo(config, sft_model, _rows("preferences.jsonl")[:480], [], tmp_path / "dpo")
    gain, stderr, metrics = _paired_gold_gain(sft_model, result.model_dir)
    assert gain >= 2 * stderr and gain > 0, (gain, stderr, metrics)


def test_ppo_stops_when_every_rollout_is_cut_before_eos(sft_model: Path, tmp_path: Path) -> None:
    # 8 new tokens: no reply of the bundled task ends that soon, so the no-EOS penalty replaces every score.
    config = PPOConfig(
        max_steps=5,
        batch_size=8,
        rollout_batch_size=16,
        max_new_tokens=8,
        reward_model_weight=0.0,
        reward_functions={GOLD: 1.0},
        progress_bar=False,
    )
    with pytest.raises(DeadSignalError, match=r"never emitted the end-of-turn token within max_new_tokens=8"):
        train_ppo(config, sft_model, None, _rows("prompts_train.jsonl")[:32], tmp_path / "ppo")
    with pytest.warns(UserWarning, match="PPO cannot learn"):
        train_ppo(
            replace(config, max_steps=2, dead_signal="warn"),
            sft_model,
            None,
            _rows("prompts_train.jsonl")[:32],
            tmp_path / "ppo-warn",
        )
