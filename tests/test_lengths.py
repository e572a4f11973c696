"""Length limits from the data (`rlhf_core.lengths`) and the dead-signal guard (`rlhf_core.guards`).

- quantiles and cut shares of a histogram match values counted by hand;
- `auto` resolves to the covered length (× headroom for sampling limits), nested sampling configs included;
- an explicit limit that cuts more than 1 − coverage of the rows stops with the numbers and the fix, unless
  `allow_truncation`; one that cuts less passes;
- measured lengths are the trainers' own encodings: prompt through the chat template, response + end-of-turn;
- the guard calls a run dead when every early rollout is flat or mostly cut, and not when one carries signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rlhf_core.generation import SamplingConfig
from rlhf_core.guards import reward_signal_problem
from rlhf_core.lengths import (
    LengthPolicy,
    LengthStats,
    TruncationError,
    measure_lengths,
    merge_stats,
    resolve_lengths,
    unresolved,
)
from rlhf_core.tokenization import encode_prompt_response
from rlhf_core.trainers.sft import SFTConfig

# 20 rows: lengths 1..20, one each.
TWENTY = LengthStats.of(range(1, 21))


def test_quantiles_and_cut_shares_by_hand() -> None:
    # 95% of 20 rows = 19 rows → the 19th smallest length is 19; the median (10 rows) is 10.
    assert TWENTY.quantile(0.95) == 19
    assert TWENTY.quantile(0.5) == 10
    assert TWENTY.quantile(1.0) == 20
    assert TWENTY.share_longer_than(18) == pytest.approx(2 / 20)
    assert TWENTY.share_longer_than(20) == 0.0
    assert TWENTY.summary() == {"count": 20, "p50": 10, "p95": 19, "max": 20}
    skewed = LengthStats.of([5] * 9 + [100])
    assert skewed.quantile(0.9) == 5 and skewed.quantile(0.95) == 100
    assert LengthStats.from_json(TWENTY.to_json()) == TWENTY
    assert merge_stats(LengthStats.of([1, 2]), None, LengthStats.of([2])).histogram == {1: 1, 2: 2}


def test_auto_resolves_to_the_covered_length_with_headroom_for_sampling() -> None:
    config = SFTConfig(max_prompt_len="auto", max_response_len="auto")
    assert unresolved(config) == ["max_prompt_len", "max_response_len"]
    prompts = LengthStats.of([30] * 19 + [90])
    resolved = resolve_lengths(config, prompts, TWENTY)
    assert (resolved.max_prompt_len, resolved.max_response_len) == (30, 19)
    assert unresolved(resolved) == []

    @dataclass(frozen=True)
    class Holder:
        max_prompt_len: object
        sampling: SamplingConfig

    holder = resolve_lengths(
        Holder("auto", SamplingConfig(max_new_tokens="auto")), prompts, TWENTY, LengthPolicy(sampling_headroom=1.25)
    )
    # 19 × 1.25 = 23.75 → 24 (ceil): a sampling limit leaves room beyond the covered length.
    assert holder.sampling.max_new_tokens == 24 and holder.max_prompt_len == 30


def test_an_explicit_limit_that_cuts_the_data_stops_with_the_numbers() -> None:
    config = SFTConfig(max_prompt_len=None, max_response_len=16)  # cuts 4 of 20 rows = 20% > 5%
    with pytest.raises(TruncationError) as err:
        resolve_lengths(config, None, TWENTY, where="sft.")
    message = str(err.value)
    assert "sft.max_response_len=16 cuts 20%" in message
    assert "p50 10, p95 19, max 20" in message and ">= 19" in message and "allow_truncation" in message
    # 19 cuts 1 row (5%): within the policy.
    assert resolve_lengths(SFTConfig(max_prompt_len=None, max_response_len=19), None, TWENTY).max_response_len == 19
    allowed = resolve_lengths(config, None, TWENTY, LengthPolicy(allow_truncation=True))
    assert allowed.max_response_len == 16
    with pytest.raises(ValueError, match="needs token lengths"):
        resolve_lengths(SFTConfig(max_prompt_len=None, max_response_len="auto"), None, None)


def test_measured_lengths_are_the_trainers_encodings(tiny_tokenizer) -> None:
    rows = [
        {"prompt": "My order is late.", "response": "Sorry about that, I will check it now."},
        {"prompt": [{"role": "user", "content": "Refund please"}], "response": "Done."},
    ]
    stats = measure_lengths(tiny_tokenizer, rows, "demonstration")
    encoded = [encode_prompt_response(tiny_tokenizer, r["prompt"], r["response"]) for r in rows]
    assert stats["prompt"] == LengthStats.of(len(e.prompt_ids) for e in encoded)
    assert stats["response"] == LengthStats.of(len(e.response_ids) for e in encoded)
    # The end-of-turn token is counted: a limit at the measured max keeps it as a target.
    assert all(e.response_ids[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") for e in encoded)
    prefs = measure_lengths(tiny_tokenizer, [{"prompt": "a", "chosen": "b c", "rejected": "d"}], "preference")
    assert prefs["response"].count == 2


def _rollout(no_eos: float, mean: float, std: float) -> dict[str, float]:
    return {"no_eos_fraction": no_eos, "shaped_score_mean": mean, "shaped_score_std": std}


def test_dead_signal_guard() -> None:
    cut = [_rollout(0.98, -1.0, 0.0), _rollout(0.95, -1.0, 0.1)]
    problem = reward_signal_problem(cut, -1.0, 48)
    assert problem is not None and "95%–98%" in problem and "max_new_tokens=48" in problem
    assert "missing_eos_score=-1.0" in problem
    # Without the penalty unfinished answers keep their own scores: not dead (a task may not use EOS at all).
    assert reward_signal_problem(cut, None, 48) is None
    flat = [_rollout(0.0, 0.3, 0.0), _rollout(0.1, 0.3, 1e-9)]
    assert "same score" in reward_signal_problem(flat, -1.0, 48)
    # One iteration with signal is enough: the run can learn.
    assert reward_signal_problem([_rollout(0.98, -1.0, 0.0), _rollout(0.5, 0.2, 0.7)], -1.0, 48) is None
    assert reward_signal_problem([_rollout(0.0, 0.3, 0.0), _rollout(0.0, 0.2, 0.5)], -1.0, 48) is None
    assert reward_signal_problem([], -1.0, 48) is None
