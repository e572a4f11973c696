"""Scoring functions: `score(prompt, response) -> float`, for judge labelers, programmatic rewards and evaluation.

resolve_judge("gold")                        the bundled task's gold judge (rlhf_core.support_bot:gold_score)
resolve_judge("reward_model", rm_dir)        a trained reward model (`RewardModelScorer`, batched)
resolve_judge("my_package.judges:politeness") any callable named `module:function` (`import_callable`)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from rlhf_core.models import disable_dropout, load_reward_model, score_sequences
from rlhf_core.tokenization import (
    Conversation,
    collate_right_padded,
    default_device,
    encode_prompt_response,
    padding_id,
)

ScoreFn = Callable[[Conversation, str], float]


def import_callable(spec: str) -> Callable[..., Any]:
    """Resolve `"package.module:function"` (or `module:Class.method`) with importlib.

    Security: this imports the module, which RUNS its top-level code — the same trust as `python -c "import
    module"`. Only name modules you trust, and keep pipeline configs that do so under review.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise TypeError(f"{spec!r} is not callable")
    return target


class RewardModelScorer:
    """A trained reward model as a judge: `scorer(prompt, response)` or, batched, `scorer.score_batch(prompt,
    responses)`. Responses are encoded exactly as the RM trainer encodes them (`encode_prompt_response`:
    separate prompt/response tokenisation, end-of-turn appended) and scored at the last real token."""

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str | None = None,
        batch_size: int = 16,
        max_prompt_len: int | None = 256,
        max_response_len: int | None = 256,
    ) -> None:
        self.device = default_device(device)
        self.model = disable_dropout(load_reward_model(path)).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        tok = self.tokenizer
        self.pad_id = padding_id(tok)
        self.batch_size, self.max_prompt_len, self.max_response_len = batch_size, max_prompt_len, max_response_len

    @torch.no_grad()
    def score_batch(self, prompt: Conversation, responses: Sequence[str]) -> list[float]:
        """RM scores `[len(responses)]` of the responses to one prompt."""
        pairs = [
            encode_prompt_response(self.tokenizer, prompt, r, self.max_prompt_len, self.max_response_len)
            for r in responses
        ]
        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            batch = collate_right_padded(pairs[start : start + self.batch_size], self.pad_id)
            scores.extend(
                score_sequences(
                    self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                ).tolist()
            )
        return scores

    def __call__(self, prompt: Conversation, response: str) -> float:
        return self.score_batch(prompt, [response])[0]


def reward_model_scorer(path: str | Path, device: torch.device | str | None = None, **kwargs: Any) -> RewardModelScorer:
    """The reward model saved at `path` as a scoring function (see `RewardModelScorer`)."""
    return RewardModelScorer(path, device=device, **kwargs)


def resolve_judge(
    spec: str | None, reward_model_path: str | Path | None = None, device: torch.device | str | None = None
) -> ScoreFn:
    """`gold` → `support_bot.gold_score`; `reward_model` → `reward_model_scorer(reward_model_path)`;
    `module:function` → that callable (imported: see `import_callable`)."""
    if spec is None:
        raise ValueError(
            "a judge labeler needs `judge`: 'reward_model', 'module:function' or 'gold' (the bundled "
            "task's rlhf_core.support_bot:gold_score)"
        )
    if spec == "gold":
        return import_callable("rlhf_core.support_bot:gold_score")
    if spec == "reward_model":
        if reward_model_path is None:
            raise ValueError("judge 'reward_model' needs a reward model path")
        return reward_model_scorer(reward_model_path, device=device)
    return import_callable(spec)
