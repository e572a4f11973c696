"""Compare policies (SFT, PPO, DPO, ...) on held-out prompts, with the same sampling settings and seeds for all.

Per model, under the same names so they line up in one view:

    eval/rm_score, eval/rm_score_stderr          mean reward-model score of the sampled responses (± s.e.)
    eval/gold_score, eval/gold_score_stderr      mean gold-judge score (the task's ground truth, when it has one)
    eval/kl_to_ref                               mean over responses of Σ_t [log π(a_t|s_t) − log π_ref(a_t|s_t)]
    eval/win_rate_rm, eval/win_rate_gold         share of prompts where the model beats the baseline (tie = ½)
    eval/response_length                         mean response tokens (EOS included)
    eval/distinct_1, eval/distinct_2             unique / all token n-grams over all responses
    eval/no_eos_fraction                         share of responses cut by max_new_tokens

`eval/kl_to_ref` is the Monte-Carlo estimate of KL(π‖π_ref) on the model's own samples, with both log-probs from a
fresh forward pass at temperature 1; it is exactly that KL's estimator when sampling is plain (temperature 1, no
top-k/top-p), and a diagnostic of drift otherwise. Every model samples with the same `SamplingConfig` and the same
seed per batch, so a model compared with itself gives identical responses: win rate ½ and KL 0.

The samples table has one row per prompt: `prompt`, then `<model>/response`, `<model>/rm_score`,
`<model>/gold_score`, `<model>/kl_to_ref` for every model (plain dicts, no pandas).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.experience import distinct_n
from rlhf_core.generation import GenerationOutput, SamplingConfig, generate
from rlhf_core.inference import load_policy
from rlhf_core.logprobs import response_forward
from rlhf_core.models import disable_dropout, load_reward_model, score_sequences
from rlhf_core.tokenization import (
    Conversation,
    EncodedPair,
    collate_right_padded,
    default_device,
    encode_prompt,
    end_of_turn_text,
    padding_id,
    prompt_of,
)

GoldFn = Callable[[Conversation, str], float]


@dataclass(frozen=True)
class ModelSamples:
    """What one model produced on the N eval prompts (every list has length N, in prompt order)."""

    name: str
    texts: list[str]
    """Decoded responses (special tokens skipped)."""
    response_ids: list[list[int]]
    """Token ids of each response in the model's tokenizer (EOS included when it ended)."""
    ended_with_eos: list[bool]
    rm_scores: list[float] | None = None
    gold_scores: list[float] | None = None
    kl_to_ref: list[float] | None = None
    """Σ_t log π − log π_ref per response."""


@dataclass(frozen=True)
class EvalReport:
    """The comparison: metrics per model (same names for each), the baseline's name, the samples table."""

    metrics: dict[str, dict[str, float]]
    """model name → {"eval/rm_score": ..., ...}."""
    samples: list[dict[str, Any]]
    """One row per prompt: `prompt` and, per model, `<model>/response`, `/rm_score`, `/gold_score`,
    `/kl_to_ref` (those available)."""
    baseline: str
    """The model the win rates compare against."""

    def table(self) -> list[dict[str, Any]]:
        """The metrics as rows `{"model": name, "eval/...": value, ...}`, in the models' order."""
        return [{"model": name, **values} for name, values in self.metrics.items()]


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error `s / √n` (s: sample standard deviation, n − 1); stderr is 0 for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
    """Share of prompts where `scores[i] > baseline_scores[i]`, a tie counting ½."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError(f"need two non-empty score lists of one length, got {len(scores)} and {len(baseline_scores)}")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores, strict=True))
    return wins / len(scores)


# --------------------------------------------------------------------------------------------------------------
# Sampling and scoring one model
# --------------------------------------------------------------------------------------------------------------


def sample_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Conversation],
    sampling: SamplingConfig,
    batch_size: int,
    max_prompt_len: int | None = None,
) -> list[GenerationOutput]:
    """Batches of `batch_size` prompts; batch k samples with seed `sampling.seed + k` (same for every model)."""
    outputs = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        config = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + k)
        outputs.append(generate(model, tokenizer, list(prompts[start : start + batch_size]), config, max_prompt_len))
    return outputs


def _real_ids(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


def _pairs_for_scorer(
    outputs: Sequence[GenerationOutput],
    prompts: Sequence[Conversation],
    policy_tokenizer: PreTrainedTokenizerBase,
    scorer_tokenizer: PreTrainedTokenizerBase,
    max_prompt_len: int | None,
) -> list[EncodedPair]:
    """Prompt + response ids for a scorer: the policy's own ids when both tokenizers share a vocabulary, else
    the texts re-encoded with the scorer's tokenizer (its end-of-turn token appended to responses that ended)."""
    same_vocab = policy_tokenizer.get_vocab() == scorer_tokenizer.get_vocab()
    eot = scorer_tokenizer.convert_tokens_to_ids(end_of_turn_text(scorer_tokenizer))
    pairs, i = [], 0
    for out in outputs:
        for row in range(out.response_ids.shape[0]):
            if same_vocab:
                pair = EncodedPair(
                    _real_ids(out.prompt_ids[row], out.prompt_attention_mask[row]),
                    _real_ids(out.response_ids[row], out.response_mask[row]),
                )
            else:
                response = scorer_tokenizer(out.texts[row], add_special_tokens=False)["input_ids"]
                pair = EncodedPair(
                    encode_prompt(scorer_tokenizer, prompts[i], max_prompt_len),
                    list(response) + ([eot] if bool(out.ended_with_eos[row]) else []),
                )
            pairs.append(pair)
            i += 1
    return pairs


@torch.no_grad()
def reward_scores(reward_model: nn.Module, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int) -> list[float]:
    """RM score of each prompt + response (`models.score_sequences`, read at the last real token)."""
    device = next(reward_model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_right_padded(pairs[start : start + batch_size], pad_id)
        scores.extend(
            score_sequences(reward_model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        )
    return scores


@torch.no_grad()
def kl_to_reference(model: nn.Module, reference: nn.Module, outputs: Sequence[GenerationOutput]) -> list[float]:
    """Σ_t [log π(a_t|s_t) − log π_ref(a_t|s_t)] of every sampled response, both from a fresh forward pass at
    temperature 1 (so a model compared with itself gives exactly 0)."""
    kls: list[float] = []
    for out in outputs:
        args = (out.prompt_ids, out.prompt_attention_mask, out.response_ids, out.response_mask)
        logp = response_forward(model, *args).logprobs
        ref_logp = response_forward(reference, *args).logprobs
        kls.extend(torch.where(out.response_mask.bool(), logp - ref_logp, torch.zeros_like(logp)).sum(-1).tolist())
    return kls


def evaluate_policy(
    name: str,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Conversation],
    sampling: SamplingConfig,
    reward_model: tuple[nn.Module, PreTrainedTokenizerBase | None] | None = None,
    reference: nn.Module | None = None,
    gold_fn: GoldFn | None = None,
    batch_size: int = 8,
    max_prompt_len: int | None = None,
) -> ModelSamples:
    """Sample from one in-memory policy and score its responses: `reward_model` is `(model, its tokenizer or None
    for the policy's)`; `reference` (for the KL) must share the policy's tokenizer."""
    model.eval()
    outputs = sample_responses(model, tokenizer, prompts, sampling, batch_size, max_prompt_len)
    texts = [t for out in outputs for t in out.texts]
    rm_scores = None
    if reward_model is not None:
        rm, rm_tokenizer = reward_model
        rm_tokenizer = rm_tokenizer or tokenizer
        pairs = _pairs_for_scorer(outputs, prompts, tokenizer, rm_tokenizer, max_prompt_len)
        pad_id = padding_id(rm_tokenizer)
        rm_scores = reward_scores(rm, pairs, pad_id, batch_size)
    return ModelSamples(
        name=name,
        texts=texts,
        response_ids=[
            _real_ids(ids, m) for out in outputs for ids, m in zip(out.response_ids, out.response_mask, strict=True)
        ],
        ended_with_eos=[bool(e) for out in outputs for e in out.ended_with_eos],
        rm_scores=rm_scores,
        gold_scores=[float(gold_fn(p, t)) for p, t in zip(prompts, texts, strict=True)] if gold_fn else None,
        kl_to_ref=kl_to_reference(model, reference, outputs) if reference is not None else None,
    )


# --------------------------------------------------------------------------------------------------------------
# Metrics and the report
# --------------------------------------------------------------------------------------------------------------


def summarize(samples: ModelSamples, baseline: ModelSamples) -> dict[str, float]:
    """The `eval/*` metrics of one model (see the module docstring); win rates against `baseline`."""
    metrics: dict[str, float] = {}
    if samples.rm_scores is not None and baseline.rm_scores is not None:
        metrics["eval/rm_score"], metrics["eval/rm_score_stderr"] = mean_and_stderr(samples.rm_scores)
        metrics["eval/win_rate_rm"] = win_rate(samples.rm_scores, baseline.rm_scores)
    if samples.gold_scores is not None and baseline.gold_scores is not None:
        metrics["eval/gold_score"], metrics["eval/gold_score_stderr"] = mean_and_stderr(samples.gold_scores)
        metrics["eval/win_rate_gold"] = win_rate(samples.gold_scores, baseline.gold_scores)
    if samples.kl_to_ref is not None:
        metrics["eval/kl_to_ref"] = sum(samples.kl_to_ref) / len(samples.kl_to_ref)
    n = len(samples.texts)
    metrics["eval/response_length"] = sum(len(ids) for ids in samples.response_ids) / n
    metrics["eval/distinct_1"] = distinct_n(samples.response_ids, 1)
    metrics["eval/distinct_2"] = distinct_n(samples.response_ids, 2)
    metrics["eval/no_eos_fraction"] = sum(not e for e in samples.ended_with_eos) / n
    return metrics


def samples_table(prompts: Sequence[Conversation], results: Sequence[ModelSamples]) -> list[dict[str, Any]]:
    """One row per prompt with every model's response and scores side by side."""
    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": prompt}
        for r in results:
            row[f"{r.name}/response"] = r.texts[i]
            for key, values in (("rm_score", r.rm_scores), ("gold_score", r.gold_scores), ("kl_to_ref", r.kl_to_ref)):
                if values is not None:
                    row[f"{r.name}/{key}"] = values[i]
        rows.append(row)
    return rows


def _tokenizer_or_none(path: str | Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved beside a model, None when the directory has none (the policy's is then used)."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def evaluate_models(
    models: Mapping[str, str | Path],
    prompts: Sequence[Conversation | Mapping[str, Any]],
    sampling_config: SamplingConfig,
    reward_model_path: str | Path | None = None,
    reference_model_path: str | Path | None = None,
    gold_fn: GoldFn | None = None,
    baseline: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_len: int | None = None,
    device: torch.device | str | None = None,
) -> EvalReport:
    """Evaluate every model (name → saved policy directory) on the same `prompts` (strings, message lists or
    `{"prompt"}` rows) with the same sampling (`sampling_config` with its seed replaced by `seed`).

    `reward_model_path` adds RM scores and win rates, `gold_fn(prompt, response)` gold scores and win rates,
    `reference_model_path` (same tokenizer as the models) the KL to the reference. `baseline` (default: the first
    model) is what win rates compare against. Models are loaded one at a time.
    """
    if not models:
        raise ValueError("no models to evaluate")
    baseline = baseline if baseline is not None else next(iter(models))
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(models)}")
    device = default_device(device)
    prompts = [prompt_of(p) for p in prompts]
    sampling = replace(sampling_config, seed=seed)
    rm = None
    if reward_model_path is not None:
        rm = (
            disable_dropout(load_reward_model(reward_model_path)).eval().to(device),
            _tokenizer_or_none(reward_model_path),
        )
    reference = ref_tokenizer = None
    if reference_model_path is not None:
        reference, ref_tokenizer = load_policy(reference_model_path, device=device)

    results: dict[str, ModelSamples] = {}
    for name, path in models.items():
        model, tokenizer = load_policy(path, device=device)
        if ref_tokenizer is not None and tokenizer.get_vocab() != ref_tokenizer.get_vocab():
            raise ValueError(
                f"model {name!r} and the reference have different vocabularies: token-level KL is undefined"
            )
        results[name] = evaluate_policy(
            name, model, tokenizer, prompts, sampling, rm, reference, gold_fn, batch_size, max_prompt_len
        )
        del model
        gc.collect()
    base = results[baseline]
    return EvalReport(
        metrics={name: summarize(r, base) for name, r in results.items()},
        samples=samples_table(prompts, list(results.values())),
        baseline=baseline,
    )


# --------------------------------------------------------------------------------------------------------------
# The result a user ran the pipeline for
# --------------------------------------------------------------------------------------------------------------


def _pm(metrics: Mapping[str, float], name: str) -> str:
    if name not in metrics:
        return "–"
    err = metrics.get(f"{name}_stderr")
    return f"{metrics[name]:.3f} ± {err:.3f}" if err is not None else f"{metrics[name]:.3f}"


def results_table(per_model: Mapping[str, Mapping[str, float]], baseline: str | None = None) -> str:
    """The evaluation as a plain-text table: one row per model — gold score ± s.e., RM score ± s.e., win rates
    against the baseline (gold, RM; a tie counts ½), KL to the reference (nats per response), mean length in
    tokens, no-EOS share; a last line says what the columns are."""
    header = ("model", "gold ± s.e.", "RM ± s.e.", "win gold", "win RM", "KL", "length", "no-EOS")
    rows = [header]
    for name, m in per_model.items():
        rows.append(
            (
                name,
                _pm(m, "eval/gold_score"),
                _pm(m, "eval/rm_score"),
                f"{m['eval/win_rate_gold']:.2f}" if "eval/win_rate_gold" in m else "–",
                f"{m['eval/win_rate_rm']:.2f}" if "eval/win_rate_rm" in m else "–",
                f"{m['eval/kl_to_ref']:.2f}" if "eval/kl_to_ref" in m else "–",
                f"{m.get('eval/response_length', math.nan):.1f}",
                f"{m.get('eval/no_eos_fraction', math.nan):.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"win: share of prompts where the model's response beats {baseline or 'the baseline'}'s (tie ½); "
        "KL: nats per response to the reference; length: tokens"
    )
    return "\n".join(lines)
