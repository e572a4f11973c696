"""GRPO and RLOO on the untrained tiny model, with a rule-based reward function (no reward model): they log every
metric the pipeline records, resume exactly after a kill, give the same update whether a minibatch is one
micro-batch or eight, and stop when no group carries any signal.

The tiny policy samples near-random tokens and never emits EOS, so responses are `RESPONSE_LEN` tokens with no
no-EOS penalty. Learning direction on the real task is in `test_learning_direction.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.pickles import assert_no_pickles
from safetensors.torch import load_file
from test_sft_trainer import captured_gradients

from rlhf_core.callbacks import ListLogger
from rlhf_core.guards import DeadSignalError
from rlhf_core.trainers.grpo import GRPOConfig, train_grpo

RESPONSE_LEN = 8
ROWS = [{"prompt": p} for p in ["Where is my order?", "Reset my password", "I was charged twice", "Hi"]]
LETTERS = "helpers.rewards:letter_share"
METRICS = [
    "score_mean",
    "score_std",
    "group_score_std",
    "zero_std_group_fraction",
    "kl",
    "ref_kl_per_token",
    "clip_fraction",
    "approx_kl",
    "loss",
    "grad_norm",
    "response_length",
    "no_eos_fraction",
    "distinct_2",
    "samples_per_sec",
    "tokens_per_sec",
    "peak_memory_mb",
    "time_generation_s",
    "time_update_s",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _config(**overrides) -> GRPOConfig:
    small = dict(
        max_steps=2,
        batch_size=4,
        prompts_per_iteration=2,
        num_samples_per_prompt=4,
        epochs=2,
        max_new_tokens=RESPONSE_LEN,
        missing_eos_score=None,
        learning_rate=3e-3,
        kl_coef=0.1,
        reward_model_weight=0.0,
        reward_functions={LETTERS: 1.0},
        progress_bar=False,
    )
    return GRPOConfig(**{**small, **overrides})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


class _Killed(Exception):
    """Stands for the process being killed."""


class _KillAfter(ListLogger):
    """Kills the run when the metrics of iteration `step` arrive (after its checkpoint would be written)."""

    def __init__(self, step: int, name: str) -> None:
        super().__init__()
        self.step, self.name = step, name

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.step and f"{self.name}/score_mean" in metrics:
            raise _Killed
        super().log_metrics(metrics, step)


@pytest.mark.parametrize(("algorithm", "kl_in"), [("grpo", "loss"), ("rloo", "reward")])
def test_kill_and_resume_follows_the_same_trajectory(tiny_model_dir, tmp_path, algorithm, kl_in):
    config = _config(algorithm=algorithm, kl_in=kl_in, max_steps=4, checkpoint_every=2)
    uninterrupted = ListLogger()
    full = train_grpo(config, tiny_model_dir, None, ROWS, tmp_path / "full", uninterrupted, eval_prompt_rows=ROWS)
    # Every metric the pipeline records, at every iteration, and the held-out evaluation at the end
    for name in METRICS:
        assert len(uninterrupted.series(f"{algorithm}/{name}")) == 4, name
    assert f"{algorithm}/eval_score_mean" in full.metrics and f"{algorithm}/eval_kl" in full.metrics
    assert uninterrupted.series(f"{algorithm}/kl")[-1] > 0  # the policy left the reference
    # When a second run is killed during iteration 3 (last checkpoint: 2) and started again
    with pytest.raises(_Killed):
        train_grpo(config, tiny_model_dir, None, ROWS, tmp_path / "killed", _KillAfter(3, algorithm))
    resumed_logger = ListLogger()
    resumed = train_grpo(config, tiny_model_dir, None, ROWS, tmp_path / "killed", resumed_logger)
    # Then it resumed from iteration 2 and ends with the uninterrupted run's metrics and weights
    assert resumed.resumed_from_step == 2 and full.resumed_from_step is None
    for name in ("score_mean", "kl", "loss", "clip_fraction"):
        key = f"{algorithm}/{name}"
        assert resumed_logger.series(key) == pytest.approx(uninterrupted.series(key)[2:], abs=1e-6), key
    full_weights, resumed_weights = _weights(full.model_dir), _weights(resumed.model_dir)
    for key, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, atol=1e-6, rtol=0, msg=key)
    assert_no_pickles(tmp_path / "killed")


@pytest.mark.parametrize("level", ["token", "sequence", "constant"])
def test_one_micro_batch_or_eight_hand_the_optimizer_the_same_gradient(tiny_model_dir, tmp_path, level):
    """Each micro-batch's loss is weighted by its share of the minibatch's aggregation units (tokens or responses),
    so the split does not change the gradient. (Gradients, not weights: Adam's first step is ≈ lr·sign(g), which
    turns rounding on a g ≈ 0 coordinate into a full step. The untrained model's rows all run to max_new_tokens;
    the weighting of rows of different lengths is checked by hand in test_group_advantages.py.)"""
    base = dict(max_steps=1, epochs=1, prompts_per_iteration=2, num_samples_per_prompt=4, loss_aggregation=level)
    results = {}
    grads_one = captured_gradients(
        lambda: results.update(
            a=train_grpo(_config(batch_size=8, grad_accum_steps=1, **base), tiny_model_dir, None, ROWS, tmp_path / "a")
        )
    )
    grads_eight = captured_gradients(
        lambda: results.update(
            b=train_grpo(_config(batch_size=1, grad_accum_steps=8, **base), tiny_model_dir, None, ROWS, tmp_path / "b")
        )
    )
    assert len(grads_one) == len(grads_eight) == 1
    assert any(float(g.abs().max()) > 1e-4 for g in grads_one[0])  # a real gradient
    for g1, g8 in zip(grads_one[0], grads_eight[0], strict=True):
        torch.testing.assert_close(g8, g1, atol=1e-6, rtol=1e-5)
    assert results["a"].metrics["grpo/loss"] == pytest.approx(results["b"].metrics["grpo/loss"], abs=1e-6)


def test_stops_when_no_group_carries_any_signal(tiny_model_dir, tmp_path):
    config = _config(reward_functions={"helpers.rewards:constant": 1.0})
    with pytest.raises(DeadSignalError, match="GRPO cannot learn: every response .* got the same score"):
        train_grpo(config, tiny_model_dir, None, ROWS, tmp_path / "dead")
    assert not (tmp_path / "dead" / "model").exists()
