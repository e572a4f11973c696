"""KL coefficient controllers: the β of the per-token penalty R_t = −β·KL_t (see `losses.kl_penalized_rewards`).

Each controller has `.value` (the current β) and `.update(current_kl, n_steps)`, called once per PPO
iteration with the measured KL(π‖π_ref) of the rollout (summed over tokens, mean over sequences, or whatever
quantity `target_kl` is expressed in). `state_dict()` / `load_state_dict()` make a resumed run continue with
the exact same β.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class KLController(Protocol):
    """What the PPO trainer needs from a KL controller."""

    value: float

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """β stays at `kl_coef` for the whole run."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """A fixed coefficient ignores the measured KL."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_type(state, "fixed")
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences", §2.2):

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t · (1 + K_β · e_t),   K_β = n_steps / horizon

    β grows while the measured KL is above target and shrinks below it, by at most 20 % of
    n_steps/horizon per update; the clip keeps one outlier batch from swinging β.
    `n_steps` is the number of samples (episodes) the KL was measured on, so `horizon` is in the same unit.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float) -> None:
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be > 0 for a multiplicative update, got {init_kl_coef}")
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and horizon must be > 0, got {target_kl} and {horizon}")
        self.value = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"type": "adaptive", "value": self.value, "target_kl": self.target_kl, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore β; the target and horizon come from the config, and must match the checkpoint's."""
        _check_type(state, "adaptive")
        if (float(state["target_kl"]), float(state["horizon"])) != (self.target_kl, self.horizon):
            raise ValueError(
                f"checkpoint was written with target_kl={state['target_kl']}, horizon={state['horizon']}; "
                f"this controller has target_kl={self.target_kl}, horizon={self.horizon}"
            )
        self.value = float(state["value"])


def _check_type(state: dict[str, Any], expected: str) -> None:
    if state.get("type") != expected:
        raise ValueError(f"state of a {state.get('type')!r} KL controller cannot load into a {expected!r} one")


def make_kl_controller(kl_coef: float, target_kl: float | None, horizon: float) -> KLController:
    """β fixed at `kl_coef` when `target_kl` is None, else adaptive towards `target_kl` from `kl_coef`."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
