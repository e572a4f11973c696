"""PPO's outer loop (rollout → score → KL-penalised rewards → GAE) on a tiny model: the stored experience equals
the loss functions called by hand, rollout log-probs are the policy's own, and score shaping follows its recipe."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import rlhf_core.experience as experience_module
from rlhf_core.experience import (
    ExperienceConfig,
    RunningMoments,
    critic_forward,
    distinct_n,
    experience_metrics,
    make_experience,
    shape_scores,
)
from rlhf_core.generation import SamplingConfig, generate
from rlhf_core.logprobs import response_forward
from rlhf_core.losses import gae, kl_penalized_rewards
from rlhf_core.models import PolicyWithValueHead, reward_model_from_causal_lm, score_sequences

PROMPTS = [
    "Where is my order?",
    "I was charged twice for the same subscription, please help.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reset my password"}],
    "Hi",
    "Can I change the delivery address?",
    "The app crashes when I open settings.",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy shared cores two threads spin against each
    other (measured: 10× slower); restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _with_eos_bias(model: nn.Module, eos_id: int, bias: float) -> nn.Module:
    """A copy of `model` whose LM head adds `bias` to the EOS logit: some responses end, others are cut."""
    biased = copy.deepcopy(model)
    head = nn.Linear(biased.lm_head.in_features, biased.lm_head.out_features, bias=True)
    head.weight.data.copy_(biased.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[eos_id] = bias
    biased.lm_head = head
    return biased.eval()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_tokenizer):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return _with_eos_bias(base, tiny_tokenizer.eos_token_id, 4.0)


@pytest.fixture(scope="module")
def policy(reference):
    """The reference with a perturbed LM head (so KL ≠ 0) and a fresh value head."""
    actor = copy.deepcopy(reference)
    with torch.no_grad():
        actor.lm_head.weight.mul_(3.0)
    return PolicyWithValueHead(actor, seed=0).eval()


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    return reward_model_from_causal_lm(tiny_model_dir, seed=0).eval()


def _forward(model, exp, temperature=1.0):
    with torch.no_grad():
        return response_forward(
            model, exp.prompt_ids, exp.prompt_attention_mask, exp.response_ids, exp.response_mask, temperature
        )


def test_experience_equals_the_loss_functions_called_by_hand(policy, reference, reward_model, tiny_tokenizer):
    # Given a policy that differs from its reference, a reward model and a config using every shaping step
    config = ExperienceConfig(
        max_new_tokens=10, kl_estimator="k3", gamma=0.9, gae_lambda=0.8, missing_eos_score=-2.0, score_clip=0.05
    )
    # When one batch of experience is collected
    exp = make_experience(
        policy, policy.pretrained_model, reference, reward_model, tiny_tokenizer, PROMPTS, config, kl_coef=0.3, seed=0
    )
    mask = exp.response_mask
    assert exp.ended_with_eos.any() and not exp.ended_with_eos.all()  # both branches of the no-EOS rule

    # Then each stored tensor is what the core functions give on the stored tokens
    values = _forward(policy, exp).values
    ref_logprobs = _forward(reference, exp).logprobs
    with torch.no_grad():
        input_ids = torch.cat([exp.prompt_ids, exp.response_ids], 1)
        rm = score_sequences(reward_model, input_ids, torch.cat([exp.prompt_attention_mask, mask], 1))
    scores = torch.where(exp.ended_with_eos, rm.clamp(-0.05, 0.05), torch.full_like(rm, -2.0))
    rewards, kl = kl_penalized_rewards(scores, exp.old_logprobs, ref_logprobs, mask, 0.3, "k3")
    advantages, returns = gae(rewards, values, mask, 0.9, 0.8)
    valid = mask.bool()
    torch.testing.assert_close(exp.rm_scores, rm, atol=1e-6, rtol=0)
    torch.testing.assert_close(exp.scores, scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(exp.old_values[valid], values[valid], atol=1e-6, rtol=0)
    torch.testing.assert_close(exp.ref_logprobs[valid], ref_logprobs[valid], atol=1e-6, rtol=0)
    for name, expected in (("kl", kl), ("rewards", rewards), ("advantages", advantages), ("returns", returns)):
        torch.testing.assert_close(getattr(exp, name), expected, atol=1e-6, rtol=0, msg=name)
    # and the policy really moved away from the reference (the test would be vacuous at KL = 0)
    assert float(exp.kl[valid].mean()) > 0.01


@pytest.mark.parametrize("old_logprobs", ["sampler", "forward"])
def test_a_shared_body_critic_reads_its_values_off_the_sampler(
    policy, reference, reward_model, tiny_tokenizer, monkeypatch, old_logprobs
):
    """With the sampler's log-probs, a critic sharing the policy's body takes V(s_t) from the decode steps (no
    critic pass over the rollout); the values equal a full forward pass over prompt + response. With
    `old_logprobs="forward"` the pass runs, as before."""
    critic = copy.deepcopy(policy)
    with torch.no_grad():  # a value head with real weights, so the values differ from state to state
        critic.value_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    passes = []

    def counted(*args, **kwargs):
        passes.append(1)
        return critic_forward(*args, **kwargs)

    monkeypatch.setattr(experience_module, "critic_forward", counted)
    config = ExperienceConfig(max_new_tokens=10, old_logprobs=old_logprobs)
    exp = make_experience(
        critic, critic.pretrained_model, reference, reward_model, tiny_tokenizer, PROMPTS, config, kl_coef=0.1, seed=3
    )
    assert len(passes) == (0 if old_logprobs == "sampler" else 1)
    valid = exp.response_mask.bool()
    assert exp.ended_with_eos.any() and not valid.all()  # finished rows are in play
    fresh = _forward(critic, exp).values
    assert float(fresh[valid].std()) > 0.1  # not vacuous: the values vary
    torch.testing.assert_close(exp.old_values[valid], fresh[valid], atol=1e-5, rtol=0)
    # Under bf16 autocast the sampler's values are still float32 (GAE and the value loss read them)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout = generate(critic, tiny_tokenizer, PROMPTS[:2], SamplingConfig(max_new_tokens=3, seed=0), values=True)
    assert rollout.values.dtype == torch.float32 and rollout.values.shape == rollout.response_ids.shape


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_are_the_policys_own_and_kl_starts_at_zero(
    reference, reward_model, tiny_tokenizer, temperature
):
    # Given a policy identical to its reference (the first PPO iteration)
    policy = PolicyWithValueHead(copy.deepcopy(reference), seed=0).eval()
    config = ExperienceConfig(max_new_tokens=12, temperature=temperature)
    # When experience is collected
    exp = make_experience(
        policy, policy.pretrained_model, reference, reward_model, tiny_tokenizer, PROMPTS, config, kl_coef=0.1, seed=1
    )
    valid = exp.response_mask.bool()
    # Then the sampler's log-probs equal a fresh forward pass at the same temperature (docs/pitfalls.md §1) ...
    fresh = _forward(policy, exp, temperature).logprobs
    torch.testing.assert_close(exp.old_logprobs[valid], fresh[valid], atol=1e-5, rtol=0)
    # ... so the KL to the reference is 0 on every response, and the rewards are the scores alone
    per_response_kl = exp.kl.sum(1)
    assert per_response_kl.abs().max() < 1e-5
    torch.testing.assert_close(exp.rewards.sum(1), exp.scores, atol=1e-5, rtol=0)
    assert experience_metrics(exp)["kl"] == pytest.approx(0.0, abs=1e-5)


def test_minibatch_select_drops_only_padding(policy, reference, reward_model, tiny_tokenizer):
    # Given a batch of experience with responses of different lengths
    exp = make_experience(
        policy,
        policy.pretrained_model,
        reference,
        reward_model,
        tiny_tokenizer,
        PROMPTS,
        ExperienceConfig(max_new_tokens=10),
        kl_coef=0.1,
        seed=2,
    )
    rows = torch.tensor([3, 0])
    # When a minibatch of two rows is selected
    mb = exp.select(rows)
    # Then no real token is lost and all-padding columns are gone
    assert int(mb.response_mask.sum()) == int(exp.response_mask[rows].sum())
    assert int(mb.prompt_attention_mask.sum()) == int(exp.prompt_attention_mask[rows].sum())
    assert mb.response_mask[:, -1].any() and mb.prompt_attention_mask[:, 0].any()
    # and the policy scores the trimmed minibatch exactly as it scored those rows in the full batch
    full, small = _forward(policy, exp), _forward(policy, mb)
    t = mb.response_ids.shape[1]
    valid = mb.response_mask.bool()
    torch.testing.assert_close(small.logprobs[valid], full.logprobs[rows][:, :t][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(small.values[valid], full.values[rows][:, :t][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(mb.advantages, exp.advantages[rows][:, :t])


def test_shape_scores_normalises_then_clips_then_penalises_missing_eos():
    """rm = [1, 2, 3, 4]: μ = 2.5, σ² = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25, so (s − μ)/σ = ±0.4472, ±1.3416;
    clip at 1 → [−1, −0.4472, 0.4472, 1]; the third response has no EOS → −2."""
    config = ExperienceConfig(score_norm="mean_std", score_clip=1.0, missing_eos_score=-2.0)
    moments = RunningMoments()
    scores = shape_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, True, False, True]), config, moments)
    z = 0.5 / math.sqrt(1.25)
    torch.testing.assert_close(scores, torch.tensor([-1.0, -z, -2.0, 1.0]), atol=1e-6, rtol=0)
    # "std" only rescales: s / σ
    scores = shape_scores(
        torch.tensor([1.0, 3.0]),
        torch.tensor([True, True]),
        ExperienceConfig(score_norm="std", missing_eos_score=None),
        RunningMoments(),
    )
    torch.testing.assert_close(scores, torch.tensor([1.0, 3.0]), atol=1e-6, rtol=0)  # σ of [1, 3] is 1


def test_running_moments_equal_the_moments_of_all_batches_and_resume():
    # Given scores arriving in three batches of different sizes
    batches = [torch.tensor([1.0, 5.0, -2.0]), torch.tensor([0.5]), torch.tensor([3.0, 3.0, 8.0, -1.0])]
    moments = RunningMoments()
    for b in batches[:2]:
        moments.update(b)
    # When the moments are saved and restored half-way
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    restored.update(batches[2])
    # Then they equal the population moments of everything seen
    everything = torch.cat(batches).double()
    assert restored.count == 8
    assert restored.mean == pytest.approx(float(everything.mean()), abs=1e-12)
    assert restored.var == pytest.approx(float(everything.var(unbiased=False)), abs=1e-12)


def test_distinct_n_counts_unique_ngrams():
    """[1 2 3], [1 2 4]: unigrams 1 2 3 1 2 4 → 4 unique of 6; bigrams (1,2) (2,3) (1,2) (2,4) → 3 of 4."""
    sequences = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(sequences, 1) == pytest.approx(4 / 6)
    assert distinct_n(sequences, 2) == pytest.approx(3 / 4)
    assert distinct_n([[7]], 2) == 0.0
