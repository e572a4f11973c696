"""The stages' length limits, resolved from the token lengths the validate stage measured.

Each stage's `"auto"` limits become numbers here, before its trainer starts, and an explicit limit that cuts more
of the stage's data than `lengths.coverage` allows stops the stage with a `TruncationError` (nothing trains).
Which data each limit must cover:

    sft                      prompts and responses of the demonstrations
    reward_model, dpo        prompts and responses of the preferences (with `collect`: the collected rankings)
    ppo, collect, evaluate   prompts of their prompt set; sampling limits from the demonstrations' responses
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhf_core.lengths import LengthPolicy, LengthStats, merge_stats, resolve_lengths
from tasks.pointers import StagePointer

LENGTHS_KEY = "lengths"
DEMONSTRATIONS = ("sft_train", "sft_eval")
PREFERENCES = ("preference_train", "preference_eval")


def measured(validated: StagePointer, names: Sequence[str], field: str) -> LengthStats | None:
    """The merged `field` ("prompt" or "response") lengths of the validated datasets `names` (None: none)."""
    table = validated.extra.get(LENGTHS_KEY, {})
    return merge_stats(*(LengthStats.from_json(table[n][field]) for n in names if n in table and field in table[n]))


def sampling_lengths(validated: StagePointer) -> LengthStats | None:
    """What a sampling limit must cover: the demonstrations' responses, else the preferences'."""
    return measured(validated, DEMONSTRATIONS, "response") or measured(validated, PREFERENCES, "response")


def resolve_stage_lengths(
    config: Any, policy: LengthPolicy, stage: str, prompt: LengthStats | None, response: LengthStats | None
) -> Any:
    """`config` with its `"auto"` limits resolved and explicit ones checked (errors name `<stage>.<field>`)."""
    return resolve_lengths(config, prompt, response, policy, where=f"{stage}.")
