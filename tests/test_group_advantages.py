"""The critic-free math of `rlhf_core.group_advantages`, checked against arithmetic written out in each test
(float64, tolerance 1e-6)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.group_advantages import (
    aggregate,
    aggregation_units,
    group_policy_loss,
    grpo_advantages,
    k3_kl,
    kl_penalized_scores,
    rloo_advantages,
)

F64 = torch.float64
LN2 = math.log(2.0)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def assert_close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0.0)


def test_rloo_baseline_is_the_mean_of_the_other_samples() -> None:
    # Row 0: 1 − (2+6)/2 = −3;  2 − (1+6)/2 = −1.5;  6 − (1+2)/2 = 4.5.
    # Row 1: 0 − (0+3)/2 = −1.5 (twice);  3 − (0+0)/2 = 3.
    scores = t64([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    assert_close(rloo_advantages(scores), [[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]])
    # K = 2: each sample's baseline is the other one.
    assert_close(rloo_advantages(t64([[0.2, 1.0]])), [[-0.8, 0.8]])
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(t64([[1.0], [2.0]]))


def test_grpo_normalises_each_group_by_its_mean_and_sample_std() -> None:
    # μ = 3, deviations (−2, −1, 3), Σ dev² = 14, sample variance 14/2 = 7, σ = √7 = 2.6457513.
    scores = t64([[1.0, 2.0, 6.0]])
    sigma = math.sqrt(7.0)
    assert_close(grpo_advantages(scores, eps=0.0), [[-2 / sigma, -1 / sigma, 3 / sigma]])
    assert_close(grpo_advantages(scores, eps=0.5), [[-2 / (sigma + 0.5), -1 / (sigma + 0.5), 3 / (sigma + 0.5)]])
    # Dr. GRPO: no division by σ.
    assert_close(grpo_advantages(scores, scale_by_std=False), [[-2.0, -1.0, 3.0]])
    # A group whose answers all score alike carries no signal: 0, not nan.
    assert_close(grpo_advantages(t64([[5.0, 5.0, 5.0]])), [[0.0, 0.0, 0.0]])
    # Groups do not mix: the second row (10, 12, 11) has its own μ = 11, deviations (−1, 1, 0), σ = √(2/2) = 1.
    two = grpo_advantages(t64([[1.0, 2.0, 6.0], [10.0, 12.0, 11.0]]), eps=0.0)
    assert_close(two[1], [-1.0, 1.0, 0.0])


def test_k3_kl_values_and_gradient_on_sampled_tokens() -> None:
    # Token 0: π = 0.5, π_ref = 0.25 → r = 0.5, KL = 0.5 − ln 0.5 − 1 = ln 2 − 0.5 = 0.1931472.
    # Token 1: π = 0.2, π_ref = 0.4 → r = 2, KL = 2 − ln 2 − 1 = 1 − ln 2 = 0.3068528.
    # Token 2 is padding with a −inf log-prob: KL 0 and no nan in the gradient.
    logprobs = t64([[math.log(0.5), math.log(0.2), -math.inf]]).requires_grad_()
    ref = t64([[math.log(0.25), math.log(0.4), 0.0]])
    mask = t64([[1, 1, 0]])
    kl = k3_kl(logprobs, ref, mask)
    assert_close(kl, [[LN2 - 0.5, 1 - LN2, 0.0]])
    kl.sum().backward()
    # ∂KL/∂log π = 1 − r: 1 − 0.5 = 0.5 (π above π_ref: pushed down by gradient descent); 1 − 2 = −1.
    assert_close(logprobs.grad, [[0.5, -1.0, 0.0]])


def test_token_sequence_and_constant_aggregation() -> None:
    x = t64([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = t64([[1, 1, 1], [1, 0, 0]])
    assert_close(aggregate(x, mask, "token"), (1 + 2 + 3 + 4) / 4)  # 2.5: every token alike
    assert_close(aggregate(x, mask, "sequence"), ((1 + 2 + 3) / 3 + 4 / 1) / 2)  # 3.0: every response alike
    assert_close(aggregate(x, mask, "constant", max_len=4), (1 + 2 + 3 + 4) / (2 * 4))  # 1.25
    assert aggregation_units(mask, "token") == 4.0 and aggregation_units(mask, "sequence") == 2.0
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, mask, "constant")


def _loss_inputs():
    # Row 0 (A = 2): ρ = 0.3/0.2 = 1.5 and 0.1/0.2 = 0.5;  row 1 (A = −1): ρ = 0.22/0.2 = 1.1, then padding.
    logprobs = t64([[math.log(0.3), math.log(0.1)], [math.log(0.22), 0.0]]).requires_grad_()
    old = t64([[math.log(0.2), math.log(0.2)], [math.log(0.2), 0.0]])
    return logprobs, old, t64([2.0, -1.0]), t64([[1, 1], [1, 0]])


def test_group_policy_loss_clips_the_ratio_per_token() -> None:
    # ε = 0.2. Row 0, token 0: min(1.5·2, 1.2·2) = 2.4 (clipped active); token 1: min(0.5·2, 0.8·2) = 1.0.
    # Row 1, token 0: min(1.1·(−1), 1.1·(−1)) = −1.1 (inside the band).
    logprobs, old, advantages, mask = _loss_inputs()
    loss, stats = group_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, level="token")
    assert_close(loss, -(2.4 + 1.0 - 1.1) / 3)
    assert_close(stats.clip_frac, 1 / 3)
    loss.backward()
    # ∂loss/∂log π_t = −ρ_t·A/3 on unclipped tokens, 0 on the clipped one: (0, −0.5·2/3), (+1.1/3, 0).
    assert_close(logprobs.grad, [[0.0, -1.0 / 3], [1.1 / 3, 0.0]])
    seq_loss, _ = group_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, level="sequence")
    assert_close(seq_loss, -(((2.4 + 1.0) / 2) + (-1.1)) / 2)  # −0.3


def test_group_policy_loss_subtracts_the_k3_kl_to_the_reference() -> None:
    # π_ref: row 0 (0.6, 0.1) → r = 2, 1 → KL = 1 − ln 2, 0;  row 1 (0.11) → r = 0.5 → KL = ln 2 − 0.5.
    # β = 0.1: objective sum = 2.3 − 0.1·(1 − ln 2 + ln 2 − 0.5) = 2.25 over 3 tokens.
    logprobs, old, advantages, mask = _loss_inputs()
    ref = t64([[math.log(0.6), math.log(0.1)], [math.log(0.11), 0.0]])
    loss, stats = group_policy_loss(logprobs, old, advantages, mask, 0.2, "token", ref_logprobs=ref, kl_coef=0.1)
    assert_close(loss, -2.25 / 3)
    assert_close(stats.ref_kl, 0.5 / 3)


def test_kl_in_the_reward_subtracts_the_summed_k1_estimate() -> None:
    # Σ_t (ln 0.5 − ln 0.25) = 2·ln 2 = 1.3862944; β = 0.1: 1 − 0.1386294 = 0.8613706. Padding ignored.
    logprobs = t64([[math.log(0.5), math.log(0.5), -math.inf]])
    ref = t64([[math.log(0.25), math.log(0.25), -math.inf]])
    assert_close(kl_penalized_scores(t64([1.0]), logprobs, ref, t64([[1, 1, 0]]), 0.1), [1 - 0.2 * LN2])
