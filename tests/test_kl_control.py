"""KL coefficient controllers: the adaptive update against hand arithmetic, and exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_core.kl_control import AdaptiveKLController, FixedKLController


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)

    for kl in (0.0, 3.0, 1e3):
        controller.update(kl, n_steps=64)

    assert controller.value == 0.05


def test_adaptive_controller_update_arithmetic_by_hand():
    """β₀ = 0.1, target 6, horizon 10000, n_steps = 256 ⇒ K = 256/10000 = 0.0256.

    1. KL = 7.5: e = 7.5/6 − 1 = 0.25 → clipped to 0.2; β = 0.1·(1 + 0.2·0.0256) = 0.1·1.00512 = 0.100512
    2. KL = 5.4: e = 5.4/6 − 1 = −0.1 (inside the clip); β = 0.100512·(1 − 0.1·0.0256) = 0.100512·0.99744
       = 0.100512 − 0.100512·0.00256 = 0.100512 − 0.00025731072 = 0.10025468928
    3. KL = 0: e = −1 → clipped to −0.2; β = 0.10025468928·(1 − 0.00512) = 0.10025468928 − 0.0005133040091136
       = 0.0997413852708864
    4. KL = 6 (on target): e = 0, β unchanged.
    """
    controller = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    expected = [0.100512, 0.10025468928, 0.0997413852708864, 0.0997413852708864]

    for kl, beta in zip([7.5, 5.4, 0.0, torch.tensor(6.0)], expected, strict=True):
        controller.update(kl, n_steps=256)
        assert controller.value == pytest.approx(beta, abs=1e-12)


def test_adaptive_controller_raises_beta_above_target_and_lowers_it_below():
    above, below = AdaptiveKLController(0.2, 1.0, 100), AdaptiveKLController(0.2, 1.0, 100)

    above.update(1.1, n_steps=10)
    below.update(0.9, n_steps=10)

    assert below.value < 0.2 < above.value


def test_resume_from_state_dict_continues_bit_identically():
    """Given a run checkpointed after 3 updates (state serialised as JSON), when a fresh controller loads it and
    both continue with the same KLs, then β is bit-identical at every step."""
    kls = [0.3, 2.5, 1.7, 0.1, 4.0, 1.2, 0.95]
    uninterrupted = AdaptiveKLController(0.05, target_kl=1.0, horizon=500)
    for kl in kls[:3]:
        uninterrupted.update(kl, n_steps=32)
    checkpoint = json.loads(json.dumps(uninterrupted.state_dict()))

    resumed = AdaptiveKLController(0.05, target_kl=1.0, horizon=500)
    resumed.load_state_dict(checkpoint)
    assert resumed.value == uninterrupted.value
    for kl in kls[3:]:
        uninterrupted.update(kl, n_steps=32)
        resumed.update(kl, n_steps=32)
        assert resumed.value == uninterrupted.value

    fixed = FixedKLController(0.01)
    fixed.load_state_dict(json.loads(json.dumps(FixedKLController(0.07).state_dict())))
    assert fixed.value == 0.07


def test_load_state_dict_refuses_a_mismatched_checkpoint():
    adaptive = AdaptiveKLController(0.05, target_kl=1.0, horizon=500)

    with pytest.raises(ValueError, match="target_kl"):
        adaptive.load_state_dict(AdaptiveKLController(0.05, target_kl=2.0, horizon=500).state_dict())
    with pytest.raises(ValueError, match="fixed"):
        adaptive.load_state_dict(FixedKLController(0.05).state_dict())


def test_controllers_reject_invalid_settings():
    with pytest.raises(ValueError):
        FixedKLController(-0.1)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.0, target_kl=1.0, horizon=100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target_kl=1.0, horizon=0)
