"""Evaluation compares models on the same prompts with the same sampling: a model against itself ties (win rate ½,
KL 0), and every metric of two different models is the arithmetic of its samples table."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_core.evaluation import evaluate_models, mean_and_stderr, win_rate
from rlhf_core.generation import SamplingConfig
from rlhf_core.models import reward_model_from_causal_lm

PROMPTS = [
    "Where is my order?",
    "Reset my password",
    "I was charged twice",
    "Hi",
    "I want a refund",
    "The app crashes",
    "Change my delivery address",
    "Thanks for the help",
]
NAMES = [
    "eval/rm_score",
    "eval/rm_score_stderr",
    "eval/gold_score",
    "eval/gold_score_stderr",
    "eval/kl_to_ref",
    "eval/win_rate_rm",
    "eval/win_rate_gold",
    "eval/response_length",
    "eval/distinct_1",
    "eval/distinct_2",
    "eval/no_eos_fraction",
]
SAMPLING = SamplingConfig(max_new_tokens=10, temperature=1.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy shared cores two threads spin against each
    other (measured: 10× slower); restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gold_words(prompt, response: str) -> float:
    """A deterministic stand-in judge: the number of whitespace-separated words of the response."""
    return float(len(response.split()))


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    reward_model_from_causal_lm(tiny_model_dir, seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharper_model_dir(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The tiny model with its LM head scaled ×16: a much lower-entropy policy, far from the reference."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)
    path = tmp_path_factory.mktemp("sharper")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_a_model_against_itself_ties_with_zero_kl(tiny_model_dir, reward_model_dir):
    # Given the same model under two names, evaluated against itself as reference
    report = evaluate_models(
        {"a": tiny_model_dir, "b": tiny_model_dir},
        PROMPTS,
        SAMPLING,
        reward_model_path=reward_model_dir,
        reference_model_path=tiny_model_dir,
        gold_fn=gold_words,
        seed=3,
    )
    a, b = report.metrics["a"], report.metrics["b"]
    # Then both get the same metric names, every one of them, with the same values
    assert sorted(a) == sorted(b) == sorted(NAMES)
    assert a == b
    # the same sampling gave the same responses, so every comparison is a tie and the KL to itself is 0
    assert all(row["a/response"] == row["b/response"] for row in report.samples)
    assert b["eval/win_rate_rm"] == 0.5 and b["eval/win_rate_gold"] == 0.5
    assert abs(b["eval/kl_to_ref"]) < 1e-6
    assert report.baseline == "a" and [r["model"] for r in report.table()] == ["a", "b"]


def test_metrics_of_two_models_are_the_arithmetic_of_their_samples(tiny_model_dir, sharper_model_dir, reward_model_dir):
    # Given the base model and a sharper one, with the sharper one as baseline and the base as reference
    report = evaluate_models(
        {"base": tiny_model_dir, "sharp": sharper_model_dir},
        [{"prompt": p} for p in PROMPTS],
        SAMPLING,
        reward_model_path=reward_model_dir,
        reference_model_path=tiny_model_dir,
        gold_fn=gold_words,
        baseline="sharp",
        seed=0,
        batch_size=3,
    )
    rows = report.samples
    assert [row["prompt"] for row in rows] == PROMPTS
    for name in ("base", "sharp"):
        metrics = report.metrics[name]
        rm = [row[f"{name}/rm_score"] for row in rows]
        gold = [row[f"{name}/gold_score"] for row in rows]
        # Then the scores are the means of the table's columns, with the standard error s/√n
        assert metrics["eval/rm_score"] == pytest.approx(statistics.fmean(rm), abs=1e-9)
        assert metrics["eval/gold_score_stderr"] == pytest.approx(statistics.stdev(gold) / math.sqrt(len(gold)))
        assert gold == [gold_words(None, row[f"{name}/response"]) for row in rows]
        # win rates count the prompts where the model beats the baseline, ties ½
        base_rm = [row["sharp/rm_score"] for row in rows]
        wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(rm, base_rm, strict=True))
        assert metrics["eval/win_rate_rm"] == pytest.approx(wins / len(rows))
        assert metrics["eval/kl_to_ref"] == pytest.approx(statistics.fmean(row[f"{name}/kl_to_ref"] for row in rows))
        assert 0 < metrics["eval/distinct_1"] <= metrics["eval/distinct_2"] <= 1
        assert 0 < metrics["eval/response_length"] <= SAMPLING.max_new_tokens
    # and the sharper model, far from the reference, has a clearly positive KL while the reference has none
    assert report.metrics["sharp"]["eval/kl_to_ref"] > 1.0
    assert abs(report.metrics["base"]["eval/kl_to_ref"]) < 1e-6
    assert report.metrics["sharp"]["eval/win_rate_rm"] == 0.5


def test_statistics_by_hand():
    """[1, 2, 3, 4]: mean 2.5, s² = (2.25 + 0.25 + 0.25 + 2.25)/3 = 5/3, stderr = √(5/3)/2;
    [3, 1, 2] vs [1, 1, 5]: win, tie, loss → (1 + ½ + 0)/3 = ½."""
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and stderr == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_and_stderr([7.0]) == (7.0, 0.0)
    assert win_rate([3.0, 1.0, 2.0], [1.0, 1.0, 5.0]) == pytest.approx(0.5)
    assert win_rate([3.0, 4.0], [1.0, 1.0]) == 1.0


def test_unknown_baseline_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="baseline"):
        evaluate_models({"a": tiny_model_dir}, PROMPTS, SAMPLING, baseline="b")
