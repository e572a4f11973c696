"""Checks that stop a run whose training signal is dead, with the reason and the fix (docs/pitfalls.md).

A PPO run can go through every motion and learn nothing: when every rollout gets the same score, the advantages
are only the KL penalty (which pushes answers shorter); when nearly every response is cut by `max_new_tokens`,
the no-EOS penalty replaces nearly every score by one constant — the same thing. Both are visible in the first
iterations, long before a wasted run ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

NO_EOS_LIMIT = 0.9
"""Share of responses without EOS at which the reward counts as dead."""


class DeadSignalError(RuntimeError):
    """The rollouts carry no reward signal; the message says why and what to change."""


def reward_signal_problem(rollouts: Sequence[Mapping[str, float]], missing_eos_score: float | None,
                          max_new_tokens: int) -> str | None:
    """Why the rollouts (`experience_metrics` of the first iterations) carry no reward signal, or None.

    Dead when EVERY given iteration has (near) zero variance of the shaped scores, or — with the no-EOS penalty
    on — ≥ 90% of its responses without EOS (their scores are then one constant). Without the penalty, unfinished
    responses keep their own scores (a task may not use EOS at all), so only the variance counts."""
    if not rollouts:
        return None
    no_eos = [r["no_eos_fraction"] for r in rollouts]
    if missing_eos_score is not None and all(x >= NO_EOS_LIMIT for x in no_eos):
        penalty = (f"missing_eos_score={missing_eos_score} replaced their scores by one constant, so the reward "
                   "carries almost no information")
        return (f"{min(no_eos):.0%}–{max(no_eos):.0%} of the responses in the first {len(rollouts)} iterations never "
                f"emitted the end-of-turn token within max_new_tokens={max_new_tokens}: {penalty}. Fix: let "
                "max_new_tokens cover the answers (`auto` in the pipeline), and train SFT on untruncated targets "
                "(sft.max_response_len: auto) so the model learns to stop.")
    flat = [r for r in rollouts if r["shaped_score_std"] <= 1e-6 * (1.0 + abs(r["shaped_score_mean"]))]
    if len(flat) == len(rollouts):
        return (f"every response in the first {len(rollouts)} iterations got the same score "
                f"({rollouts[0]['shaped_score_mean']:.4g}, std {rollouts[0]['shaped_score_std']:.2g}): the advantages "
                "are only the KL penalty. Check the reward model (its held-out accuracy, whether it scores the "
                "policy's samples differently), the reward functions, and score_clip/missing_eos_score.")
    return None
