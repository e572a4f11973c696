"""The scalar score of a sampled response, before shaping: a reward model, reward functions, or a weighted sum.

    score(x, y) = w_rm · RM(x, y) + Σ_i w_i · f_i(x, text(y))

`RM(x, y)` is the reward model read at the last real token of prompt + response (`models.score_sequences`);
each `f_i(prompt, response_text) -> float` is a user function named `"module:function"` (a rule, a unit test, a
judge — the same kind of callable the collect stage's judge is). `text(y)` is the decoded response without
special tokens, as the evaluation and the collect stage see it. PPO shapes this score afterwards (normalisation,
clipping, the no-EOS penalty: `experience.shape_scores`) and adds the per-token KL penalty.

Security: naming `"module:function"` imports that module, which runs its top-level code (see
`judges.import_callable`); only name code you trust.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rlhf_core.generation import GenerationOutput
from rlhf_core.judges import import_callable
from rlhf_core.models import score_sequences
from rlhf_core.tokenization import Conversation

RewardFn = Callable[[Conversation, str], float]
RM_COMPONENT = "reward_model"


@dataclass
class RewardScorer:
    """Scores a rollout: `scorer(prompts, rollout)` → `[B]` total scores; `components` of the last call hold each
    term (unweighted) for logging."""

    reward_model: nn.Module | None = None
    rm_weight: float = 1.0
    functions: Mapping[str, tuple[RewardFn, float]] = field(default_factory=dict)
    """`{name: (function, weight)}`."""
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reward_model is None and self.rm_weight != 0:
            raise ValueError("a reward-model weight without a reward model")
        if self.reward_model is None and not self.functions:
            raise ValueError("nothing to score with: give a reward model or reward functions")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Conversation], rollout: GenerationOutput) -> torch.Tensor:
        device = rollout.response_ids.device
        total = torch.zeros(len(prompts), dtype=torch.float32, device=device)
        self.components = {}
        if self.reward_model is not None:
            rm = reward_model_scores(self.reward_model, rollout)
            self.components[RM_COMPONENT] = rm
            total = total + self.rm_weight * rm.float()
        for name, (fn, weight) in self.functions.items():
            values = [float(fn(p, t)) for p, t in zip(prompts, rollout.texts, strict=True)]
            bad = [v for v in values if not math.isfinite(v)]
            if bad:
                raise ValueError(f"reward function {name!r} returned a non-finite score ({bad[0]})")
            scores = torch.tensor(values, dtype=torch.float32, device=device)
            self.components[name] = scores
            total = total + weight * scores
        return total


@torch.no_grad()
def reward_model_scores(reward_model: nn.Module, rollout: GenerationOutput) -> torch.Tensor:
    """RM score `[B]` of each `prompt + response` of the rollout, read at the last real token (the final EOS
    when the row ended, else the last sampled token)."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)  # [B, P+T]
    attention_mask = torch.cat(
        [rollout.prompt_attention_mask, rollout.response_mask.to(rollout.prompt_attention_mask.dtype)], dim=1
    )
    return score_sequences(reward_model, input_ids, attention_mask)


def build_scorer(
    reward_model: nn.Module | None, rm_weight: float, reward_functions: Mapping[str, float]
) -> RewardScorer:
    """A scorer from config values: `reward_functions` is `{"module:function": weight}` (imported here)."""
    functions = {spec: (import_callable(spec), float(weight)) for spec, weight in reward_functions.items()}
    return RewardScorer(reward_model if rm_weight != 0 else None, rm_weight if rm_weight != 0 else 0.0, functions)


def as_scorer(scorer: RewardScorer | nn.Module) -> RewardScorer:
    """A bare reward model is the scorer `1 · RM`."""
    return scorer if isinstance(scorer, RewardScorer) else RewardScorer(scorer, 1.0)
