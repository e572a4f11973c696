"""The RLHF math of `rlhf_core.losses`, checked against arithmetic written out in each test.

Hand values are in float64 with a 1e-6 tolerance (most agree to 1e-12). Every log/exp value used is written
out; where the teaching guide's worked numbers are wrong, the test says so and asserts the correct ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core.losses import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    ppo_policy_loss,
    ppo_total_loss,
    sft_loss,
    value_loss,
    whiten,
)

TOL = 1e-6
F64 = torch.float64


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def assert_close(actual: torch.Tensor, expected, tol: float = TOL) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0.0)


def right_padded_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(F64)


# ----------------------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------------------


def test_masked_reductions_match_hand_values_and_ignore_nonfinite_padding():
    """Given x = [[1, 2, (3)], [4, (nan), (inf)]] where () is masked out,
    the valid entries are 1, 2, 4: sum = 7, mean = 7/3,
    squared deviations (−4/3)², (−1/3)², (5/3)² = 16/9 + 1/9 + 25/9 = 42/9,
    unbiased variance = (42/9)/2 = 7/3, population variance = (42/9)/3 = 14/9.
    Per row (dim=1): means 3/2 and 4/1. A row with no valid entry averages to 0, not nan.
    """
    x = t64([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])
    mask = t64([[1, 1, 0], [1, 0, 0]])

    assert_close(masked_sum(x, mask), 7.0)
    assert_close(masked_mean(x, mask), 7.0 / 3.0)
    assert_close(masked_var(x, mask), 7.0 / 3.0)
    assert_close(masked_var(x, mask, unbiased=False), 14.0 / 9.0)
    assert_close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    assert_close(masked_mean(x, torch.zeros_like(mask), dim=1), [0.0, 0.0])


# ----------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------


def _two_token_sft_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence [p0, p1, r0, r1] (2 prompt + 2 response tokens), vocabulary of 3, r0 = 1 and r1 = 0.

    Position 1 predicts r0 with logits [0, 0, 0]; position 2 predicts r1 with logits [2, 0, 0]. Positions 0
    (predicts the prompt token p1) and 3 (predicts past the end) hold arbitrary logits that must not count.
    """
    logits = t64([[[5.0, -1.0, 0.5], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [9.0, -9.0, 3.0]]])
    labels = torch.tensor([[2, 1, 1, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1]])
    return logits, labels, loss_mask


def test_sft_loss_equals_hand_value_on_two_response_tokens():
    """log p(r0) = 0 − log(e⁰ + e⁰ + e⁰) = −log 3 = −1.0986122886681098
    log p(r1) = 2 − log(e² + 1 + 1) = 2 − log(9.38905609893065) = 2 − 2.2395447662218846 = −0.2395447662218846
    loss = (1.0986122886681098 + 0.2395447662218846) / 2 = 0.6690785274449972
    """
    logits, labels, loss_mask = _two_token_sft_example()

    loss = sft_loss(logits, labels, loss_mask)

    assert_close(loss, 0.6690785274449972)
    assert_close(sft_loss(logits, labels, loss_mask, reduction="sum"), 2 * 0.6690785274449972)


def test_sft_loss_ignores_prompt_and_padding_labels():
    """Given a batch of two right-padded rows, when the labels under mask 0 are replaced (even by -100)
    and the logits that predict nothing are changed, then the loss is unchanged."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g, dtype=F64)
    labels = torch.randint(0, 5, (2, 6), generator=g)
    # Row 0: 2 prompt + 4 response; row 1: 1 prompt + 2 response + 3 pad.
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])

    other_labels = torch.where(loss_mask.bool(), labels, torch.full_like(labels, -100))
    other_logits = logits.clone()
    other_logits[:, -1] = 100.0  # the last position predicts no label
    other_logits[1, 3:] = -50.0  # positions that predict padding

    assert_close(sft_loss(other_logits, other_labels, loss_mask), sft_loss(logits, labels, loss_mask), 1e-12)


def test_sft_loss_runs_log_softmax_in_float32_for_bf16_logits():
    logits, labels, loss_mask = _two_token_sft_example()
    bf16 = logits.to(torch.bfloat16)

    loss = sft_loss(bf16, labels, loss_mask)

    assert loss.dtype == torch.float32
    assert_close(loss, sft_loss(bf16.float(), labels, loss_mask), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Reward model (Bradley-Terry)
# ----------------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_equals_hand_value():
    """Pairs with r_w − r_l = 1.0 − 0.7 = 0.3 and 0.2 − 0.5 = −0.3:
    −log σ(0.3) = log(1 + e^−0.3) = 0.5543552444685271
    −log σ(−0.3) = −log σ(0.3) + 0.3 = 0.8543552444685271   (log σ(x) − log σ(−x) = x)
    loss = (0.5543552444685271 + 0.8543552444685271) / 2 = 0.7043552444685271; accuracy = 1/2.
    With margin 0.1: logits 0.2 and −0.4,
    −log σ(0.2) = log(1 + e^−0.2) = log(1.8187307530779817) = 0.5981388693815918
    −log σ(−0.4) = log(1 + e^0.4) = log(2.4918246976412703) = 0.9130152523999526
    loss = 0.7555770608907722; accuracy still 1/2 (margins do not change the ranking).
    """
    chosen, rejected = t64([1.0, 0.2]), t64([0.7, 0.5])

    loss, accuracy = bradley_terry_loss(chosen, rejected)
    margin_loss, margin_accuracy = bradley_terry_loss(chosen, rejected, margin=t64([0.1, 0.1]))

    assert_close(loss, 0.7043552444685271)
    assert_close(accuracy, 0.5)
    assert_close(margin_loss, 0.7555770608907722)
    assert_close(margin_accuracy, 0.5)


def test_bradley_terry_accuracy_counts_a_tie_as_wrong():
    """An untrained RM that scores everything alike must read accuracy 0, not look half right."""
    _, accuracy = bradley_terry_loss(t64([1.0, 2.0, 0.5]), t64([1.0, 0.0, 0.5]))

    assert_close(accuracy, 1.0 / 3.0)


def test_bradley_terry_loss_flips_when_chosen_and_rejected_swap():
    """Since −log σ(d) + log σ(−d) = −d, loss(a, b) − loss(b, a) = −mean(a − b);
    and without ties, accuracy(a, b) + accuracy(b, a) = 1."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, generator=g, dtype=F64), torch.randn(64, generator=g, dtype=F64)

    loss_ab, acc_ab = bradley_terry_loss(a, b)
    loss_ba, acc_ba = bradley_terry_loss(b, a)

    assert_close(loss_ab - loss_ba, -(a - b).mean(), 1e-12)
    assert_close(acc_ab + acc_ba, 1.0)


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = t64([0.1, -0.3]).requires_grad_(), t64([0.2, -0.5]).requires_grad_()

    loss, accuracy = bradley_terry_loss(chosen, rejected)
    loss.backward()

    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert not accuracy.requires_grad


# ----------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------


def _dpo_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two pairs. Pair 0: chosen log-ratio −10 − (−12) = 2, rejected −14 − (−13) = −1, so h = 3.
    Pair 1: chosen −5 − (−5) = 0, rejected −20 − (−8) = −12, so h = 12."""
    return t64([-10.0, -5.0]), t64([-14.0, -20.0]), t64([-12.0, -5.0]), t64([-13.0, -8.0])


def test_dpo_sigmoid_loss_and_implicit_rewards_equal_hand_values():
    """β = 0.1, so βh = 0.3 and 1.2:
    −log σ(0.3) = 0.5543552444685271
    −log σ(1.2) = log(1 + e^−1.2) = log(1.3011942119122022) = 0.26328246733803123
    loss = (0.5543552444685271 + 0.26328246733803123) / 2 = 0.40881885590327917
    implicit rewards β·(log π − log π_ref): chosen [0.2, 0.0], rejected [−0.1, −1.2].
    """
    loss, chosen_rewards, rejected_rewards = dpo_loss(*_dpo_batch(), beta=0.1)

    assert_close(loss, 0.40881885590327917)
    assert_close(chosen_rewards, [0.2, 0.0])
    assert_close(rejected_rewards, [-0.1, -1.2])


def test_conservative_dpo_with_label_smoothing_equals_hand_value():
    """ε = 0.1: −0.9·log σ(βh) − 0.1·log σ(−βh), with −log σ(−x) = −log σ(x) + x:
    pair 0: 0.9·0.5543552444685271 + 0.1·(0.5543552444685271 + 0.3) = 0.5543552444685271 + 0.03 = 0.5843552444685271
    pair 1: 0.26328246733803123 + 0.1·1.2 = 0.38328246733803123
    loss = 0.48381885590327917
    """
    loss, _, _ = dpo_loss(*_dpo_batch(), beta=0.1, label_smoothing=0.1)

    assert_close(loss, 0.48381885590327917)


def test_ipo_and_hinge_losses_equal_hand_values():
    """β = 0.1. IPO: (h − 1/(2β))² = (h − 5)²: (3 − 5)² = 4 and (12 − 5)² = 49, mean 26.5.
    Hinge: relu(1 − βh): relu(1 − 0.3) = 0.7 and relu(1 − 1.2) = 0, mean 0.35."""
    ipo, _, _ = dpo_loss(*_dpo_batch(), beta=0.1, loss_type="ipo")
    hinge, _, _ = dpo_loss(*_dpo_batch(), beta=0.1, loss_type="hinge")

    assert_close(ipo, 26.5)
    assert_close(hinge, 0.35)


def test_dpo_loss_is_log_2_at_zero_margin():
    """h = 0 ⇒ −log σ(0) = log 2 = 0.6931471805599453, with or without label smoothing
    (−(1−ε)·log σ(0) − ε·log σ(0) = log 2), and whatever the individual log-ratios are."""
    policy = t64([-3.0, -7.5])
    ref = t64([-4.0, -7.0])  # chosen and rejected get the same log-ratio: [1.0, −0.5]

    for smoothing in (0.0, 0.2):
        loss, _, _ = dpo_loss(policy, policy, ref, ref, beta=0.5, label_smoothing=smoothing)
        assert_close(loss, 0.6931471805599453)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_gradient_raises_chosen_and_lowers_rejected_logps(loss_type):
    """At h = 3 (β = 0.1, below IPO's target 5 and inside the hinge margin), descending the loss
    must raise log π(y_w) and lower log π(y_l): d loss/d chosen < 0 and d loss/d rejected > 0."""
    chosen, rejected = t64([-10.0]).requires_grad_(), t64([-14.0]).requires_grad_()

    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, t64([-12.0]), t64([-13.0]), 0.1, loss_type)
    loss.backward()

    assert chosen.grad.item() < 0 < rejected.grad.item()
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_rejects_unknown_loss_type_and_misplaced_label_smoothing():
    batch = _dpo_batch()
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*batch, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*batch, beta=0.1, loss_type="ipo", label_smoothing=0.1)


# ----------------------------------------------------------------------------------------------------------
# The guide's 5-token PPO example, recomputed by hand
# ----------------------------------------------------------------------------------------------------------

GAMMA, GAE_LAMBDA, KL_COEF, CLIP_EPS = 0.99, 0.95, 0.02, 0.2
OLD_LOGPROBS = [-1.10, -0.50, -0.70, -1.40, -0.30]  # "Your order is delayed ." under π_old
REF_LOGPROBS = [-1.15, -0.50, -0.72, -1.55, -0.30]
VALUES = [-1.0, -1.5, -2.0, -3.0, -4.0]
SCORE = -12.0

# R_t = −β·(log π_old − log π_ref), plus the score on the last token:
#   k1 = [−1.10+1.15, −0.50+0.50, −0.70+0.72, −1.40+1.55, −0.30+0.30] = [0.05, 0, 0.02, 0.15, 0]
#   R  = [−0.02·0.05, 0, −0.02·0.02, −0.02·0.15, −12 − 0] = [−0.001, 0, −0.0004, −0.003, −12.0]
HAND_REWARDS = [-0.001, 0.0, -0.0004, -0.003, -12.0]
# δ_t = R_t + γ·V_{t+1} − V_t, V_5 = 0:
#   δ_4 = −12.0 + 0 + 4.0                       = −8.0
#   δ_3 = −0.003 + 0.99·(−4.0) + 3.0 = −0.003 − 3.96 + 3.0   = −0.963
#   δ_2 = −0.0004 + 0.99·(−3.0) + 2.0 = −0.0004 − 2.97 + 2.0 = −0.9704
#   δ_1 = 0 + 0.99·(−2.0) + 1.5 = −1.98 + 1.5                = −0.48
#   δ_0 = −0.001 + 0.99·(−1.5) + 1.0 = −0.001 − 1.485 + 1.0  = −0.486
# A_t = δ_t + γλ·A_{t+1}, γλ = 0.99·0.95 = 0.9405:
#   A_4 = −8.0
#   A_3 = −0.963 − 0.9405·8.0         = −0.963 − 7.524              = −8.487
#   A_2 = −0.9704 − 0.9405·8.487      = −0.9704 − 7.9820235         = −8.9524235
#   A_1 = −0.48 − 0.9405·8.9524235    = −0.48 − 8.41975430175       = −8.89975430175
#   A_0 = −0.486 − 0.9405·8.89975430175 = −0.486 − 8.370218920795875 = −8.856218920795875
HAND_ADVANTAGES = [-8.856218920795875, -8.89975430175, -8.9524235, -8.487, -8.0]
# returns_t = A_t + V_t:
#   [−8.856218920795875 − 1.0, −8.89975430175 − 1.5, −8.9524235 − 2.0, −8.487 − 3.0, −8.0 − 4.0]
HAND_RETURNS = [-9.856218920795875, -10.39975430175, -10.9524235, -11.487, -12.0]
# The guide's table: A = [−8.21, −7.70, −8.05, −8.49, −8.00], targets = [−7.21, −6.20, −6.05, −5.49, −4.00].
GUIDE_ADVANTAGES = [-8.21, -7.70, -8.05, -8.49, -8.00]
GUIDE_TARGETS = [-7.21, -6.20, -6.05, -5.49, -4.00]


def _worked_rollout() -> tuple[torch.Tensor, ...]:
    """The 5-token rollout as a batch of one row, followed by 2 padding columns holding garbage."""
    pad = [float("nan"), 123.0]
    mask = t64([[1, 1, 1, 1, 1, 0, 0]])
    return (
        t64([OLD_LOGPROBS + pad]),
        t64([REF_LOGPROBS + pad]),
        t64([VALUES + pad]),
        t64([SCORE]),
        mask,
    )


def test_worked_example_rewards_advantages_and_returns_equal_hand_values():
    """See the comment block above for every step (R_t, δ_t, A_t, returns)."""
    old_logprobs, ref_logprobs, values, scores, mask = _worked_rollout()

    rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, KL_COEF)
    advantages, returns = gae(rewards, values, mask, GAMMA, GAE_LAMBDA)

    assert_close(kl, [[0.05, 0.0, 0.02, 0.15, 0.0, 0.0, 0.0]])
    assert_close(rewards, [HAND_REWARDS + [0.0, 0.0]])
    assert_close(advantages, [HAND_ADVANTAGES + [0.0, 0.0]])
    assert_close(returns, [HAND_RETURNS + [0.0, 0.0]])


def test_worked_example_in_float32_agrees_to_a_few_ulps():
    """Trainers run in float32, where one ULP at |A| ≈ 9 is 9.5e-7: allow 4 ULPs against the float64 hand values."""
    old_logprobs, ref_logprobs, values, scores, mask = (x.float() for x in _worked_rollout())

    rewards, _ = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, KL_COEF)
    advantages, returns = gae(rewards, values, mask, GAMMA, GAE_LAMBDA)

    assert advantages.dtype == torch.float32
    assert_close(advantages.double(), [HAND_ADVANTAGES + [0.0, 0.0]], 4e-6)
    assert_close(returns.double(), [HAND_RETURNS + [0.0, 0.0]], 4e-6)


def test_guide_table_is_wrong_for_early_tokens_and_its_value_targets_have_the_wrong_sign():
    """Checking the guide's table against the hand computation above:

    - A_3 = −8.487 ≈ −8.49 and A_4 = −8.0 are right (the guide computes those two in its text).
    - A_0..A_2 are wrong: correct values are −8.8562, −8.8998, −8.9524 (guide −8.21, −7.70, −8.05).
      With a terminal −12 and values falling by ≤ 1 per step, the advantage stays near −8.5 ... −9 all along.
    - Its value targets are A_t − V_t (e.g. −8.21 − (−1.0) = −7.21), not A_t + V_t: correct targets are
      [−9.8562, −10.3998, −10.9524, −11.487, −12.0]; even A_4 + V_4 = −8 − 4 = −12 (the score itself), not −4.
    """
    old_logprobs, ref_logprobs, values, scores, mask = _worked_rollout()
    rewards, _ = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, KL_COEF)
    advantages, returns = gae(rewards, values, mask, GAMMA, GAE_LAMBDA)
    advantages, returns = advantages[0, :5], returns[0, :5]

    rounded_agrees = (advantages - t64(GUIDE_ADVANTAGES)).abs() < 0.005
    assert rounded_agrees.tolist() == [False, False, False, True, True]
    assert_close(t64(GUIDE_TARGETS), t64(GUIDE_ADVANTAGES) - t64(VALUES), 1e-9)  # the guide's sign slip
    assert ((returns - t64(GUIDE_TARGETS)).abs() > 2.0).all()


def test_worked_example_clipped_policy_term_and_value_loss_at_t0():
    """New log-prob at t = 0 is −1.45 (old −1.10); A_0 = −8.856218920795875; ε = 0.2.

    ρ = exp(−1.45 + 1.10) = exp(−0.35) = 0.7046880897187134, below 1 − ε = 0.8.
    unclipped ρ·A = 0.7046880897187134·(−8.856218920795875) = −6.240871993426372
    clipped 0.8·A = −7.0849751366367
    min(−6.2409, −7.0850) = −7.0850: the CLIPPED term is active (for A < 0 and ρ < 1 − ε the clip binds,
    the objective is flat, the token's gradient is 0). The guide picks the clipped term too, but with its
    wrong A_0 = −8.21 it reports −6.57; the correct per-token loss is −min(...) = 7.0849751366367.
    approx KL = (ρ − 1) − log ρ = −0.2953119102812866 + 0.35 = 0.0546880897187134.

    Value loss with V_new = −7.5 and target G_0 = −9.856218920795875 (the guide: −7.21, and no ½):
    ½·(−7.5 + 9.856218920795875)² = ½·2.356218920795875² = ½·5.551767602716479 = 2.7758838013582396.
    With value clipping c = 0.2 around V_old = −1.0: V_clip = −1.0 + clamp(−6.5, −0.2, 0.2) = −1.2,
    (−1.2 + 9.856218920795875)² = 8.656218920795875² = 74.93012600474452 > 5.5518, so the clipped error is
    used: loss = 37.46506300237226 and its gradient is 0.
    """
    new_logprob = t64([[-1.45]]).requires_grad_()
    one = t64([[1.0]])

    policy_loss, stats = ppo_policy_loss(new_logprob, t64([[-1.10]]), t64([[HAND_ADVANTAGES[0]]]), one, CLIP_EPS)
    policy_loss.backward()

    assert_close(policy_loss, 7.0849751366367)
    assert new_logprob.grad.item() == 0.0
    assert_close(stats.clip_frac, 1.0)
    assert_close(stats.ratio_mean, 0.7046880897187134)
    assert_close(stats.approx_kl, 0.0546880897187134)

    new_value = t64([[-7.5]]).requires_grad_()
    target = t64([[HAND_RETURNS[0]]])
    unclipped, _ = value_loss(new_value, t64([[-1.0]]), target, one)
    clipped, value_stats = value_loss(new_value, t64([[-1.0]]), target, one, clip_range=0.2)
    clipped.backward()

    assert_close(unclipped, 2.7758838013582396)
    assert_close(clipped, 37.46506300237226)
    assert_close(value_stats.clip_frac, 1.0)
    assert new_value.grad.item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# KL-penalised rewards
# ----------------------------------------------------------------------------------------------------------


def test_k3_estimator_equals_hand_values():
    """k3 = (r − 1) − log r, r = exp(ref − logprob), on the worked example's tokens:
    t=0: r = e^−0.05 = 0.951229424500714,  k3 = −0.048770575499286 + 0.05 = 0.001229424500714
    t=2: r = e^−0.02 = 0.9801986733067553, k3 = −0.0198013266932447 + 0.02 = 0.0001986733067553
    t=3: r = e^−0.15 = 0.8607079764250578, k3 = −0.1392920235749422 + 0.15 = 0.0107079764250578
    t=1, t=4: r = 1, k3 = 0. Rewards: −0.02·k3, and −12 on the last token.
    """
    old_logprobs, ref_logprobs, _, scores, mask = _worked_rollout()

    rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, KL_COEF, estimator="k3")

    hand_k3 = [0.001229424500714, 0.0, 0.0001986733067553, 0.0107079764250578, 0.0]
    assert_close(kl, [hand_k3 + [0.0, 0.0]], 1e-12)
    assert_close(rewards, [[-0.02 * k for k in hand_k3[:4]] + [-12.0, 0.0, 0.0]], 1e-12)


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    g = torch.Generator().manual_seed(2)
    logprobs = -torch.rand(8, 16, generator=g, dtype=F64) * 5
    ref_logprobs = -torch.rand(8, 16, generator=g, dtype=F64) * 5
    mask = torch.ones(8, 16, dtype=F64)
    scores = torch.zeros(8, dtype=F64)

    _, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.1, estimator="k3")
    _, kl_equal = kl_penalized_rewards(scores, logprobs, logprobs, mask, 0.1, estimator="k3")

    assert (kl >= 0).all() and (kl > 0).any()
    assert (kl_equal == 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_lowers_reward_when_policy_is_more_confident_than_reference(estimator):
    """logprobs > ref_logprobs (the policy put more mass on its own token) ⇒ KL_t > 0 ⇒ R_t < 0 = the reward of
    a token on which policy and reference agree."""
    mask = t64([[1, 1]])
    rewards, kl = kl_penalized_rewards(t64([0.0]), t64([[-0.5, -1.0]]), t64([[-1.5, -1.0]]), mask, 0.1, estimator)

    assert kl[0, 0] > 0 and rewards[0, 0] < 0
    assert rewards[0, 1] == 0


def test_score_lands_on_last_real_token_of_each_right_padded_row():
    """Rows of 3, 1 and 4 valid tokens in T = 4; logprobs = ref_logprobs so only the scores remain;
    padded positions hold nan and must stay exactly 0."""
    mask = right_padded_mask([3, 1, 4], 4)
    logprobs = torch.where(mask.bool(), t64(-1.0), t64(float("nan")))

    rewards, kl = kl_penalized_rewards(t64([1.5, -2.0, 0.25]), logprobs, logprobs, mask, 0.05)

    assert_close(rewards, [[0, 0, 1.5, 0], [-2.0, 0, 0, 0], [0, 0, 0, 0.25]], 0.0)
    assert (kl == 0).all()
    assert not rewards.requires_grad


# ----------------------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------------------


def _gae_reference_loop(rewards: list[float], values: list[float], gamma: float, gae_lambda: float):
    """Plain Python GAE for ONE unpadded sequence, straight from the definition."""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * gae_lambda * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


def test_batched_gae_equals_a_python_loop_per_sequence_alone():
    """Given random rewards/values for 6 right-padded rows of lengths 1..9 with garbage in the padding,
    when GAE runs on the batch, then each row equals the plain loop on that row alone (and 0 on padding)."""
    g = torch.Generator().manual_seed(3)
    lengths, T, gamma, gae_lambda = [9, 1, 5, 7, 2, 9], 9, 0.97, 0.9
    mask = right_padded_mask(lengths, T)
    rewards = torch.where(mask.bool(), torch.randn(6, T, generator=g, dtype=F64), t64(float("nan")))
    values = torch.where(mask.bool(), torch.randn(6, T, generator=g, dtype=F64), t64(1e6))

    advantages, returns = gae(rewards, values, mask, gamma, gae_lambda)

    for row, n in enumerate(lengths):
        hand_adv, hand_ret = _gae_reference_loop(rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, gae_lambda)
        assert_close(advantages[row, :n], hand_adv, 1e-12)
        assert_close(returns[row, :n], hand_ret, 1e-12)
        alone_adv, _ = gae(
            rewards[row : row + 1, :n], values[row : row + 1, :n], mask[row : row + 1, :n], gamma, gae_lambda
        )
        assert_close(advantages[row : row + 1, :n], alone_adv, 0.0)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_gae_limits_lambda_zero_is_td_error_and_lambda_one_is_discounted_return():
    """λ = 0 ⇒ A_t = δ_t; λ = 1 ⇒ returns_t = Σ_k γ^k R_{t+k} (Monte-Carlo), whatever the values.
    Rewards [1, 2, 3], values [0.5, −1, 2], γ = 0.9:
    λ=0: δ_2 = 3 − 2 = 1; δ_1 = 2 + 0.9·2 + 1 = 4.8; δ_0 = 1 + 0.9·(−1) − 0.5 = −0.4
    λ=1: G_2 = 3; G_1 = 2 + 0.9·3 = 4.7; G_0 = 1 + 0.9·4.7 = 5.23
    """
    rewards, values, mask = t64([[1.0, 2.0, 3.0]]), t64([[0.5, -1.0, 2.0]]), t64([[1, 1, 1]])

    td, _ = gae(rewards, values, mask, 0.9, 0.0)
    _, mc_returns = gae(rewards, values, mask, 0.9, 1.0)

    assert_close(td, [[-0.4, 4.8, 1.0]])
    assert_close(mc_returns, [[5.23, 4.7, 3.0]])


def test_gae_outputs_are_detached():
    rewards = torch.randn(2, 4, dtype=F64, requires_grad=True)
    values = torch.randn(2, 4, dtype=F64, requires_grad=True)

    advantages, returns = gae(rewards, values, torch.ones(2, 4), 1.0, 0.95)

    assert not advantages.requires_grad and not returns.requires_grad


# ----------------------------------------------------------------------------------------------------------
# Whitening
# ----------------------------------------------------------------------------------------------------------


def test_whiten_hand_value_and_statistics_over_valid_tokens_only():
    """Valid [1, 2, 3] (+ one pad): μ = 2, σ² = (1 + 0 + 1)/3 = 2/3, 1/sqrt(2/3 + 1e-8) = 1.2247448622060026,
    so the output is [−1.2247448622060026, 0, 1.2247448622060026, 0]."""
    x, mask = t64([[1.0, 2.0, 3.0, 99.0]]), t64([[1, 1, 1, 0]])

    assert_close(whiten(x, mask), [[-1.2247448622060026, 0.0, 1.2247448622060026, 0.0]], 1e-12)
    assert_close(whiten(x, mask, shift_mean=False), [[0.7752551377939974, 2.0, 3.2247448622060026, 0.0]], 1e-12)


def test_whiten_gives_zero_mean_unit_variance_and_ignores_padding():
    g = torch.Generator().manual_seed(4)
    mask = right_padded_mask([8, 3, 6, 1], 8)
    x = torch.randn(4, 8, generator=g, dtype=F64) * 7 + 3

    out = whiten(x, mask)
    out_other_padding = whiten(torch.where(mask.bool(), x, t64(1e9)), mask)

    assert_close(masked_mean(out, mask), 0.0, 1e-12)
    assert_close(masked_var(out, mask, unbiased=False), 1.0, 1e-6)
    assert_close(out_other_padding, out, 0.0)
    assert (out[mask == 0] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# PPO policy and value losses
# ----------------------------------------------------------------------------------------------------------


def test_ppo_policy_loss_on_the_four_clipping_cases_equals_hand_values():
    """ε = 0.2. Tokens (A, ρ) with ρ given by its log: log 1.5 = 0.4054651081081644, log 0.5 = −0.6931471805599453,
    log 1.1 = 0.09531017980432493:
      1. A = +2, ρ = 1.5: min(3.0, 1.2·2 = 2.4)   = 2.4   clipped  (gradient 0)
      2. A = +2, ρ = 0.5: min(1.0, 0.8·2 = 1.6)   = 1.0   unclipped
      3. A = −2, ρ = 1.5: min(−3.0, −2.4)         = −3.0  unclipped
      4. A = −2, ρ = 0.5: min(−1.0, −1.6)         = −1.6  clipped  (gradient 0)
      5. A = +1, ρ = 1.1: min(1.1, 1.1)           = 1.1   inside the band
      6. padding (nan log-prob and advantage): ignored, and its gradient is 0, not nan
    loss = −(2.4 + 1.0 − 3.0 − 1.6 + 1.1)/5 = −(−0.1)/5 = 0.02; clip_frac = 2/5.
    d loss/d logprob_t = −A_t·ρ_t/5 where unclipped: token 2: −2·0.5/5 = −0.2; token 3: 2·1.5/5 = 0.6;
    token 5: −1·1.1/5 = −0.22; tokens 1 and 4: 0.
    ratio_mean = (1.5 + 0.5 + 1.5 + 0.5 + 1.1)/5 = 1.02.
    approx_kl = mean((ρ − 1) − log ρ): 1.5 → 0.5 − 0.4054651081081644 = 0.0945348918918356;
    0.5 → −0.5 + 0.6931471805599453 = 0.1931471805599453; 1.1 → 0.1 − 0.09531017980432493 = 0.00468982019567507;
    (2·0.0945348918918356 + 2·0.1931471805599453 + 0.00468982019567507)/5 = 0.11601079301984737.
    """
    old_logprobs = t64([[-1.0, -1.0, -1.0, -1.0, -1.0, 0.0]])
    log_ratio = [math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), math.log(1.1)]
    logprobs = t64([[-1.0 + r for r in log_ratio] + [float("nan")]]).requires_grad_()
    advantages = t64([[2.0, 2.0, -2.0, -2.0, 1.0, float("nan")]])
    mask = t64([[1, 1, 1, 1, 1, 0]])

    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    loss.backward()

    assert_close(loss, 0.02, 1e-12)
    assert_close(logprobs.grad, [[0.0, -0.2, 0.6, 0.0, -0.22, 0.0]], 1e-12)
    assert_close(stats.clip_frac, 0.4)
    assert_close(stats.ratio_mean, 1.02, 1e-12)
    assert_close(stats.approx_kl, 0.11601079301984737, 1e-12)
    assert set(stats.as_dict()) == {"clip_frac", "approx_kl", "ratio_mean"}


def test_ppo_clipping_binds_exactly_outside_the_band_in_the_advantage_direction():
    """Given ratios spread over [0.5, 1.5] (none within 1e-3 of the band edges) and advantages of both signs,
    then a token's gradient is 0 exactly when A > 0 and ρ > 1+ε, or A < 0 and ρ < 1−ε, and clip_frac is the
    fraction of those tokens."""
    g = torch.Generator().manual_seed(5)
    eps = 0.2
    ratio = torch.rand(4, 64, generator=g, dtype=F64) + 0.5
    near_edge = ((ratio - (1 - eps)).abs() < 1e-3) | ((ratio - (1 + eps)).abs() < 1e-3)
    ratio = torch.where(near_edge, t64(1.0), ratio)
    advantages = torch.randn(4, 64, generator=g, dtype=F64)
    old_logprobs = -torch.rand(4, 64, generator=g, dtype=F64) * 3
    logprobs = (old_logprobs + ratio.log()).requires_grad_()
    mask = torch.ones(4, 64, dtype=F64)

    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, eps)
    loss.backward()

    expected_clipped = ((advantages > 0) & (ratio > 1 + eps)) | ((advantages < 0) & (ratio < 1 - eps))
    assert torch.equal(logprobs.grad == 0, expected_clipped)
    assert_close(stats.clip_frac, expected_clipped.double().mean(), 1e-12)
    assert 0 < stats.clip_frac < 1


def test_value_loss_with_and_without_clipping_equals_hand_values():
    """c = 0.5, targets G = [1, 1, 1], new values V = [2, 0.3, 1.2] (+ one pad).
    Unclipped squared errors (2−1)² = 1, (0.3−1)² = 0.49, (1.2−1)² = 0.04 ⇒ loss = ½·1.53/3 = 0.255, mse = 0.51.
    Old values [0, 0, 0.8]: V_clip = old + clamp(V − old, −0.5, 0.5) = [0.5, 0.3, 1.2], clipped errors
    0.25, 0.49, 0.04, never strictly larger ⇒ max = [1, 0.49, 0.04], loss 0.255, clip_frac 0.
    Old values [3, 0, 0.8]: V_clip_0 = 3 + clamp(−1, −0.5, 0.5) = 2.5 ⇒ (2.5 − 1)² = 2.25 > 1 ⇒
    max = [2.25, 0.49, 0.04], loss = ½·2.78/3 = 0.46333..., clip_frac = 1/3, and token 0's gradient is 0.
    """
    nan = float("nan")  # garbage on the padded token must reach neither the loss nor the gradient
    values = t64([[2.0, 0.3, 1.2, 7.0]]).requires_grad_()
    returns, mask = t64([[1.0, 1.0, 1.0, nan]]), t64([[1, 1, 1, 0]])

    plain, plain_stats = value_loss(values, t64([[0.0, 0.0, 0.8, nan]]), returns, mask)
    inside, inside_stats = value_loss(values, t64([[0.0, 0.0, 0.8, nan]]), returns, mask, clip_range=0.5)
    outside, outside_stats = value_loss(values, t64([[3.0, 0.0, 0.8, nan]]), returns, mask, clip_range=0.5)
    outside.backward()

    assert_close(plain, 0.255, 1e-12)
    assert_close(plain_stats.mse, 0.51, 1e-12)
    assert_close(plain_stats.clip_frac, 0.0)
    assert_close(inside, 0.255, 1e-12)
    assert_close(inside_stats.clip_frac, 0.0)
    assert_close(outside, 2.78 / 6, 1e-12)
    assert_close(outside_stats.clip_frac, 1 / 3, 1e-12)
    # ½·d/dV (V − G)²/3 = (V − G)/3 where unclipped: token 1 → −0.7/3, token 2 → 0.2/3.
    assert_close(values.grad, [[0.0, -0.7 / 3, 0.2 / 3, 0.0]], 1e-12)


# ----------------------------------------------------------------------------------------------------------
# Entropy and the total loss
# ----------------------------------------------------------------------------------------------------------


def test_entropy_of_uniform_logits_is_log_vocab_size():
    """Uniform over V = 50 ⇒ H = log 50 = 3.912023005428146, in float64 and from bf16 logits (upcast to float32)."""
    logits = torch.full((2, 3, 50), 4.2, dtype=F64)
    mask = torch.ones(2, 3)

    assert_close(entropy_from_logits(logits, mask), 3.912023005428146, 1e-12)
    bf16_entropy = entropy_from_logits(logits.to(torch.bfloat16), mask)
    assert bf16_entropy.dtype == torch.float32
    assert_close(bf16_entropy, 3.912023005428146, 1e-6)


def test_entropy_hand_value_masks_padding_and_survives_extreme_logits():
    """Valid tokens:
      logits [0, log 3] ⇒ p = [1/4, 3/4]; H = logsumexp − Σ p·z = log 4 − ¾·log 3
          = 1.3862943611198906 − 0.75·1.0986122886681098 = 0.5623351446188083
      logits [200, 200] ⇒ uniform over 2, H = log 2 = 0.6931471805599453 (exp(200) overflows float32)
      logits [1e4, −1e4] ⇒ one-hot, H = 0 (−Σ p·log p would give 0·(−inf) = nan)
    mean = (0.5623351446188083 + 0.6931471805599453 + 0)/3 = 0.4184941083929179.
    A padded uniform token (H = log 2) would raise the mean if it counted."""
    logits = t64([[[0.0, math.log(3.0)], [200.0, 200.0], [1e4, -1e4], [0.0, 0.0]]])
    mask = t64([[1, 1, 1, 0]])

    entropy = entropy_from_logits(logits, mask)

    assert_close(entropy, 0.4184941083929179, 1e-12)


def test_ppo_total_loss_is_the_negated_guide_objective():
    """The guide maximises L = L_CLIP − c1·L_VF + c2·S with L_CLIP = −7.5, L_VF = 0.55, S = 2.4, c1 = 0.5,
    c2 = 0.01: L = −7.5 − 0.275 + 0.024 = −7.751. Our policy_loss = −L_CLIP = 7.5, so the loss to minimise is
    7.5 + 0.5·0.55 − 0.01·2.4 = 7.751 = −L."""
    total = ppo_total_loss(t64(7.5), t64(0.55), t64(2.4), vf_coef=0.5, ent_coef=0.01)

    assert_close(total, 7.751, 1e-12)
