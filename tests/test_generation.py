"""Sampling: the log-probs it returns are those of the distribution it drew from; EOS and length limits hold;
greedy decoding matches transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

from rlhf_core.generation import (
    NUCLEUS_WINDOW,
    GenerationOutput,
    SamplingConfig,
    candidate_logits,
    draw,
    filter_logits,
    generate,
)
from rlhf_core.logprobs import response_forward
from rlhf_core.models import PolicyWithValueHead

PROMPTS = [
    "Where is my order?",
    "I was charged twice for the same subscription, please help.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reset my password"}],
    "Hi",
    "Can I change the delivery address?",
    "The app crashes when I open settings.",
]


def _with_eos_bias(model: nn.Module, eos_id: int, bias: float) -> nn.Module:
    """A copy of `model` whose LM head adds `bias` to the EOS logit: a policy that stops after a few tokens."""
    biased = copy.deepcopy(model)
    head = nn.Linear(biased.lm_head.in_features, biased.lm_head.out_features, bias=True)
    head.weight.data.copy_(biased.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[eos_id] = bias
    biased.lm_head = head
    return biased.eval()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def stopping_model(model, tiny_tokenizer):
    # e^4 ≈ 55 against ~500 other tokens of logit ≈ 0: EOS has probability ≈ 0.1 per step
    return _with_eos_bias(model, tiny_tokenizer.eos_token_id, 4.0)


def _forward_logprobs(model, out: GenerationOutput, temperature: float = 1.0):
    with torch.no_grad():
        return response_forward(
            model, out.prompt_ids, out.prompt_attention_mask, out.response_ids, out.response_mask, temperature
        )


def test_rollout_logprobs_equal_a_fresh_forward_pass(stopping_model, tiny_tokenizer):
    # Given rows that stop at different steps and rows cut by max_new_tokens
    out = generate(stopping_model, tiny_tokenizer, PROMPTS * 2, SamplingConfig(max_new_tokens=12, seed=0))
    assert out.ended_with_eos.any() and not out.ended_with_eos.all()
    # When the same policy re-scores the responses in one forward pass (temperature 1, no filtering)
    fresh = _forward_logprobs(stopping_model, out)
    # Then the sampler's log-probs are the policy's, token for token
    mask = out.response_mask.bool()
    torch.testing.assert_close(out.logprobs[mask], fresh.logprobs[mask], atol=1e-5, rtol=0)
    assert (out.logprobs[~mask] == 0).all()


def test_rollout_logprobs_at_temperature_are_those_of_the_scaled_distribution(stopping_model, tiny_tokenizer):
    out = generate(stopping_model, tiny_tokenizer, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0.7, seed=1))
    mask = out.response_mask.bool()
    scaled = _forward_logprobs(stopping_model, out, temperature=0.7)
    torch.testing.assert_close(out.logprobs[mask], scaled.logprobs[mask], atol=1e-5, rtol=0)
    # And they are not the untempered policy's: a trainer must re-score at the same temperature
    plain = _forward_logprobs(stopping_model, out, temperature=1.0)
    assert (out.logprobs[mask] - plain.logprobs[mask]).abs().max() > 1e-2


def _truncated_logprob(logits: torch.Tensor, token: int, top_k: int, top_p: float) -> float:
    """Reference in float64: keep the top-k tokens, then the smallest prefix holding top_p of their mass,
    renormalise, and return log p(token) (-inf when the token was filtered out)."""
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k else order
    kept_probs = probs[kept] / probs[kept].sum()
    n_keep, mass = 0, 0.0
    while mass < top_p and n_keep < len(kept):
        mass += float(kept_probs[n_keep])
        n_keep += 1
    nucleus = kept[:n_keep]
    if token not in nucleus:
        return float("-inf")
    return float(torch.log(probs[token] / probs[nucleus].sum()))


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.3), (20, 0.5)])
def test_top_k_top_p_logprobs_are_renormalised_over_kept_tokens(stopping_model, tiny_tokenizer, top_k, top_p):
    config = SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=top_k, top_p=top_p, seed=2)
    out = generate(stopping_model, tiny_tokenizer, PROMPTS, config)
    scaled = _forward_logprobs(stopping_model, out, temperature=0.8)  # logits already divided by 0.8
    for i, t in out.response_mask.nonzero().tolist():
        expected = _truncated_logprob(scaled.logits[i, t], int(out.response_ids[i, t]), top_k, top_p)
        assert expected > float("-inf"), "sampled a token outside the top-k / top-p set"
        assert abs(float(out.logprobs[i, t]) - expected) < 1e-5


def test_filter_logits_keeps_at_least_the_most_likely_token():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.equal(filter_logits(logits, temperature=2.0), logits / 2)


def _full_log_p(logits: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Candidate log-probs scattered back onto the whole vocabulary (-inf elsewhere)."""
    log_p = logits.log_softmax(-1)
    if ids is None:
        return log_p
    return torch.full((logits.shape[0], 4096), float("-inf"), dtype=log_p.dtype).scatter(-1, ids, log_p)


def _logits(kind: str) -> torch.Tensor:
    """`[8, 4096]` logits: `peaked` (the nucleus fits the 256-token window), `flat` (it does not), `mixed` (4 rows
    of each: one flat row must send the whole batch to the full sort), `medium` (top-50 leaves real mass
    outside, so normalising over the wrong set shows), `bf16` (logits rounded to bf16's grid: ties everywhere)."""
    logits = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))
    if kind == "mixed":
        return torch.cat([logits[:4] * 6.0, logits[4:] * 0.1])
    if kind == "bf16":
        return (logits * 6.0).bfloat16().float()
    return logits * {"peaked": 6.0, "flat": 0.1, "medium": 1.0}[kind]


@pytest.mark.parametrize(
    ("kind", "top_k", "top_p", "windowed"),
    [
        ("peaked", 0, 0.9, True),
        ("peaked", 0, 0.3, True),
        ("peaked", 50, 0.8, True),
        ("peaked", 7, 1.0, True),
        ("peaked", 0, 1.0, False),  # nothing to filter: the whole vocabulary
        ("flat", 0, 0.9, False),
        ("mixed", 0, 0.9, False),
        ("medium", 50, 0.5, True),
        ("bf16", 50, 1.0, None),  # windowed unless a tie with the 50th runs past the window
        ("bf16", 0, 0.9, True),
    ],
)
def test_candidate_window_gives_filter_logits_distribution(kind, top_k, top_p, windowed):
    logits = _logits(kind)
    # When the sampler's short path computes the distribution
    window, ids = candidate_logits(logits, 0.7, top_k, top_p)
    # Then it is filter_logits' distribution over the whole vocabulary, token for token (top-k ties kept)
    reference = filter_logits(logits, 0.7, top_k, top_p).log_softmax(-1)
    torch.testing.assert_close(_full_log_p(window, ids), reference, atol=1e-5, rtol=0)
    # And the window is short exactly when it can be
    if windowed is not None:
        assert (ids is not None) == windowed
    if ids is not None:
        assert window.shape[-1] == max(top_k + 1, NUCLEUS_WINDOW)
        # greedy on the window picks the vocabulary's argmax token
        assert torch.equal(ids.gather(-1, window.argmax(-1, keepdim=True)).squeeze(-1), logits.argmax(-1))


def test_bf16_ties_with_the_kth_logit_are_kept():
    # Given logits whose 3rd..6th largest values are equal (as bf16 rounding makes them)
    logits = torch.full((1, 4096), -5.0)
    logits[0, :6] = torch.tensor([4.0, 3.0, 2.0, 2.0, 2.0, 2.0])
    window, ids = candidate_logits(logits, 1.0, top_k=3)
    # Then all four tied tokens stay candidates, as filter_logits keeps them
    kept = set(ids[torch.isfinite(window)].tolist())
    assert kept == {0, 1, 2, 3, 4, 5}
    # And a tie running past the 256-token window sends the batch to the full vocabulary, all 302 tokens kept
    logits[0, 2:302] = 2.0
    window, ids = candidate_logits(logits, 1.0, top_k=3)
    assert ids is None and int(torch.isfinite(window).sum()) == 302


def test_draw_stops_on_a_nan_distribution():
    with pytest.raises(FloatingPointError, match="NaN"):
        draw(torch.tensor([[0.0, float("nan")]]))


def test_draw_picks_each_index_with_its_probability():
    # Given one 5-way distribution repeated over 40 000 rows
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    log_p = probs.log().expand(40_000, 5)
    # When each row draws once
    counts = torch.bincount(draw(log_p, torch.Generator().manual_seed(0)), minlength=5).double()
    # Then the frequencies are the probabilities (binomial s.e. <= 0.0025; 4 s.e. = 0.01) and p = 0 never comes
    torch.testing.assert_close(counts / counts.sum(), probs.double(), atol=0.01, rtol=0)
    assert counts[4] == 0


def test_bf16_precision_decodes_under_bf16_and_reports_that_distribution(stopping_model, tiny_tokenizer):
    # Given responses sampled with precision bf16
    out = generate(stopping_model, tiny_tokenizer, PROMPTS, SamplingConfig(max_new_tokens=8, seed=3, precision="bf16"))
    mask = out.response_mask.bool()
    # When the same responses are re-scored in float32 and under bf16 autocast
    fp32 = _forward_logprobs(stopping_model, out).logprobs[mask]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _forward_logprobs(stopping_model, out).logprobs[mask]
    # Then the sampler's log-probs are the bf16 forward's (to bf16 rounding), not the float32 one's
    sampled = out.logprobs[mask]
    assert (sampled - bf16).abs().max() < (sampled - fp32).abs().max()
    assert (sampled - fp32).abs().max() > 1e-4  # bf16 really ran: float32 would agree to ~1e-6
    assert (sampled - bf16).abs().max() < 0.1


def test_eos_stops_a_row_and_max_new_tokens_caps_the_rest(stopping_model, tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    out = generate(stopping_model, tiny_tokenizer, PROMPTS * 2, SamplingConfig(max_new_tokens=12, seed=0))
    assert out.ended_with_eos.any() and not out.ended_with_eos.all()
    assert out.response_ids.shape[1] <= 12
    for ids, mask, ended in zip(out.response_ids, out.response_mask, out.ended_with_eos, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # one contiguous block from column 0
        assert (ids[n:] == pad).all()
        assert eos not in ids[: n - 1].tolist()  # nothing generated past an EOS
        if ended:
            assert ids[n - 1] == eos
        else:
            assert n == 12 and ids[n - 1] != eos


def test_rows_that_all_end_stop_the_loop_early(model, tiny_tokenizer):
    # Given a policy that always says EOS first
    always_stop = _with_eos_bias(model, tiny_tokenizer.eos_token_id, 100.0)
    out = generate(always_stop, tiny_tokenizer, PROMPTS[:3], SamplingConfig(max_new_tokens=50, seed=0))
    # Then every response is exactly the EOS, with its log-prob (≈ 0) kept in the mask
    assert out.response_ids.tolist() == [[tiny_tokenizer.eos_token_id]] * 3
    assert out.response_mask.tolist() == [[1]] * 3
    assert out.ended_with_eos.all() and out.texts == ["", "", ""]
    assert out.logprobs.abs().max() < 1e-6


@pytest.mark.parametrize("eos_bias", [0.0, 0.4, 100.0])  # rarely / sometimes / always stopping at once
def test_greedy_generation_matches_transformers_greedy(model, tiny_tokenizer, eos_bias):
    policy = _with_eos_bias(model, tiny_tokenizer.eos_token_id, eos_bias)
    ours = generate(policy, tiny_tokenizer, PROMPTS, SamplingConfig(max_new_tokens=10, do_sample=False))
    hf_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=10,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    with torch.no_grad():
        theirs = policy.generate(
            input_ids=ours.prompt_ids, attention_mask=ours.prompt_attention_mask, generation_config=hf_config
        )
    assert torch.equal(theirs[:, ours.prompt_ids.shape[1] :], ours.response_ids)


def test_value_head_policy_generates_like_its_body_and_mode_is_restored(tiny_model_dir, model, tiny_tokenizer):
    policy = PolicyWithValueHead.from_pretrained(tiny_model_dir).train()
    config = SamplingConfig(max_new_tokens=8, seed=5)
    with_head = generate(policy, tiny_tokenizer, PROMPTS, config)
    plain = generate(model, tiny_tokenizer, PROMPTS, config)
    assert torch.equal(with_head.response_ids, plain.response_ids)
    torch.testing.assert_close(with_head.logprobs, plain.logprobs, atol=1e-6, rtol=0)
    assert policy.pretrained_model.training  # put back in training mode after sampling in eval mode


def test_seed_makes_sampling_reproducible(model, tiny_tokenizer):
    first = generate(model, tiny_tokenizer, PROMPTS, SamplingConfig(max_new_tokens=8, seed=7))
    again = generate(model, tiny_tokenizer, PROMPTS, SamplingConfig(max_new_tokens=8, seed=7))
    other = generate(model, tiny_tokenizer, PROMPTS, SamplingConfig(max_new_tokens=8, seed=8))
    assert torch.equal(first.response_ids, again.response_ids)
    assert not torch.equal(first.response_ids, other.response_ids)
    assert first.texts == [
        tiny_tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(first.response_ids, first.response_mask, strict=True)
    ]


def test_prompts_are_left_padded(model, tiny_tokenizer):
    out = generate(model, tiny_tokenizer, ["Hi", "Where is my order? It is late."], SamplingConfig(max_new_tokens=2))
    assert out.prompt_attention_mask[0, 0] == 0 and out.prompt_attention_mask[:, -1].all()
    assert out.prompt_ids[0, 0] == tiny_tokenizer.pad_token_id


@pytest.mark.parametrize(
    "kwargs",
    [{"max_new_tokens": 0}, {"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"precision": "fp16"}],
)
def test_sampling_config_rejects_invalid_values(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)
