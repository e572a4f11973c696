"""Checks that stop a run whose training signal is dead, with the reason and the fix (docs/pitfalls.md): a reward
model at chance (§2), rollouts without reward signal (§5).

A PPO run can go through every motion and learn nothing: when every rollout gets the same score, the advantages
are only the KL penalty (which pushes answers shorter); when nearly every response is cut by `max_new_tokens`,
the no-EOS penalty replaces nearly every score by one constant — the same thing. Both are visible in the first
iterations, long before a wasted run ends.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf_core.models import score_sequences
from rlhf_core.tokenization import collate_right_padded, encode_prompt_response, padding_id

NO_EOS_LIMIT = 0.9
"""Share of responses without EOS at which the reward counts as dead."""


class DeadSignalError(RuntimeError):
    """The rollouts carry no reward signal; the message says why and what to change."""


def reward_signal_problem(
    rollouts: Sequence[Mapping[str, float]], missing_eos_score: float | None, max_new_tokens: int
) -> str | None:
    """Why the rollouts (`experience_metrics` of the first iterations) carry no reward signal, or None.

    Dead when EVERY given iteration has (near) zero variance of the shaped scores, or — with the no-EOS penalty
    on — ≥ 90% of its responses without EOS (their scores are then one constant). Without the penalty, unfinished
    responses keep their own scores (a task may not use EOS at all), so only the variance counts."""
    if not rollouts:
        return None
    no_eos = [r["no_eos_fraction"] for r in rollouts]
    if missing_eos_score is not None and all(x >= NO_EOS_LIMIT for x in no_eos):
        penalty = (
            f"missing_eos_score={missing_eos_score} replaced their scores by one constant, so the reward "
            "carries almost no information"
        )
        return (
            f"{min(no_eos):.0%}–{max(no_eos):.0%} of the responses in the first {len(rollouts)} iterations never "
            f"emitted the end-of-turn token within max_new_tokens={max_new_tokens}: {penalty}. Fix: let "
            "max_new_tokens cover the answers (`auto` in the pipeline), and train SFT on untruncated targets "
            "(sft.max_response_len: auto) so the model learns to stop."
        )
    flat = [r for r in rollouts if r["shaped_score_std"] <= 1e-6 * (1.0 + abs(r["shaped_score_mean"]))]
    if len(flat) == len(rollouts):
        return (
            f"every response in the first {len(rollouts)} iterations got the same score "
            f"({rollouts[0]['shaped_score_mean']:.4g}, std {rollouts[0]['shaped_score_std']:.2g}): the advantages "
            "are only the KL penalty. Check the reward model (its held-out accuracy, whether it scores the "
            "policy's samples differently), the reward functions, and score_clip/missing_eos_score."
        )
    return None


@torch.no_grad()
def reward_model_accuracy(
    reward_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict],
    batch_size: int = 16,
    max_prompt_len: int | None = None,
) -> float:
    """Pairwise accuracy of the RM on `{"prompt", "chosen", "rejected"}` rows: the share of pairs with
    r(chosen) > r(rejected) (a tie counts as wrong, as in `losses.bradley_terry_loss`)."""
    if not pairs:
        raise ValueError("need at least one pair to measure reward-model accuracy")
    device = next(reward_model.parameters()).device
    pad_id = padding_id(tokenizer)
    correct = 0
    for start in range(0, len(pairs), batch_size):
        rows = list(pairs)[start : start + batch_size]
        encoded = [
            encode_prompt_response(tokenizer, r["prompt"], r[k], max_prompt_len)
            for k in ("chosen", "rejected")
            for r in rows
        ]
        batch = collate_right_padded(encoded, pad_id)
        scores = score_sequences(reward_model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        correct += int((scores[: len(rows)] > scores[len(rows) :]).sum())
    return correct / len(pairs)


def check_reward_model(
    reward_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    accuracy: float | None,
    eval_pairs: Sequence[dict] | None,
    min_accuracy: float,
    mode: str = "raise",
    max_prompt_len: int | None = None,
) -> float | None:
    """Refuse (`mode="raise"`) or warn about a reward model at chance (docs/pitfalls.md §2): held-out pairwise
    `accuracy` (measured on `eval_pairs` when not given) below `min_accuracy`. Returns the accuracy used, None
    when neither is available (warns)."""
    if accuracy is None and eval_pairs:
        accuracy = reward_model_accuracy(reward_model, tokenizer, eval_pairs, max_prompt_len=max_prompt_len)
    if accuracy is None:
        warnings.warn(
            "PPO starts without a held-out accuracy of the reward model: an RM at chance makes PPO "
            "optimise noise. Pass reward_model_eval_accuracy or reward_model_eval_pairs.",
            stacklevel=3,
        )
        return None
    if accuracy < min_accuracy:
        message = (
            f"reward model held-out accuracy {accuracy:.3f} is below min_reward_model_accuracy="
            f"{min_accuracy}: PPO against an RM at chance optimises noise "
            "(train the RM longer or on more data)"
        )
        if mode == "raise":
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    return accuracy
