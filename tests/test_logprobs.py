"""Log-probs of response tokens: alignment, padding invariance, temperature, sequence sums."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_core.logprobs import (
    gather_logprobs,
    response_forward,
    response_logprobs,
    sequence_logprobs,
    shared_prompt_logprobs,
    token_logprobs,
)
from rlhf_core.models import PolicyWithValueHead
from rlhf_core.tokenization import collate_right_padded, encode_prompt_response, left_pad_prompts

ROWS = [
    ("Where is my order?", "It shipped yesterday and arrives Friday."),
    ("I was charged twice.", "Sorry! Refunded."),
    ([{"role": "user", "content": "How do I reset my password?"}], "Use the 'Forgot password' link."),
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    return [encode_prompt_response(tiny_tokenizer, p, r) for p, r in ROWS]


def _alone_logprobs(model, pair) -> torch.Tensor:
    """Reference: the response's log-probs from one unpadded sequence, log_softmax in float64."""
    ids = torch.tensor([pair.prompt_ids + pair.response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = logits.log_softmax(-1)
    n = len(pair.prompt_ids)
    positions = torch.arange(n - 1, ids.shape[1] - 1)
    return logp[positions, ids[0, positions + 1]]


def test_token_logprobs_are_shifted_log_softmax():
    # Given logits for 2 sequences of 4 tokens over a 5-token vocabulary
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.randint(0, 5, (2, 4), generator=g)
    # When scored, then column t is log softmax(logits[t])[labels[t+1]]
    out = token_logprobs(logits, labels)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    expected = logits.double().log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)
    # And temperature divides the logits first
    hot = token_logprobs(logits, labels, temperature=0.7)
    expected_hot = (logits.double() / 0.7).log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(hot.double(), expected_hot, atol=1e-6, rtol=0)


def test_bf16_logits_are_scored_in_float32():
    logits = torch.randn(1, 3, 7).to(torch.bfloat16)
    labels = torch.tensor([[1, 2, 3]])
    out = gather_logprobs(logits, labels)
    assert out.dtype == torch.float32
    expected = logits.double().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        gather_logprobs(logits, labels, temperature=0.0)


def test_right_padded_batch_matches_each_sequence_alone(model, pairs):
    # Given a right-padded training batch
    batch = collate_right_padded(pairs, pad_id=0)
    # When scored in one forward pass
    with torch.no_grad():
        logprobs, mask = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    # Then the masked columns are exactly the response tokens, with the log-probs of each sequence scored alone
    assert logprobs.shape == mask.shape == (len(pairs), batch["input_ids"].shape[1] - 1)
    for i, pair in enumerate(pairs):
        assert int(mask[i].sum()) == len(pair.response_ids)
        got = logprobs[i][mask[i].bool()]
        torch.testing.assert_close(got.double(), _alone_logprobs(model, pair), atol=1e-5, rtol=0)


def test_left_and_right_padding_give_the_same_logprobs(model, pairs):
    right = collate_right_padded(pairs, pad_id=0)
    # Given the same sequences left-padded (the layout a rollout produces)
    input_ids, attention_mask = left_pad_prompts([p.prompt_ids + p.response_ids for p in pairs], pad_id=0)
    response_mask = torch.zeros_like(attention_mask)
    for i, p in enumerate(pairs):
        response_mask[i, input_ids.shape[1] - len(p.response_ids) :] = 1
    with torch.no_grad():
        lp_right, m_right = response_logprobs(
            model, right["input_ids"], right["attention_mask"], right["response_mask"]
        )
        lp_left, m_left = response_logprobs(model, input_ids, attention_mask, response_mask)
    # Then the response log-probs agree token for token
    for i in range(len(pairs)):
        torch.testing.assert_close(lp_left[i][m_left[i].bool()], lp_right[i][m_right[i].bool()], atol=1e-5, rtol=0)


def test_sequence_logprobs_sum_response_tokens_only(model, pairs):
    batch = collate_right_padded(pairs, pad_id=0)
    with torch.no_grad():
        totals = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    expected = torch.stack([_alone_logprobs(model, p).sum() for p in pairs])
    assert totals.shape == (len(pairs),)
    torch.testing.assert_close(totals.double(), expected, atol=1e-5, rtol=0)


def test_response_forward_uses_rollout_layout(model, pairs):
    # Given left-padded prompts and right-padded responses (pads after a response are masked out)
    prompt_ids, prompt_mask = left_pad_prompts([p.prompt_ids for p in pairs], pad_id=0)
    width = max(len(p.response_ids) for p in pairs)
    response_ids = torch.zeros(len(pairs), width, dtype=torch.long)
    response_mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for i, p in enumerate(pairs):
        response_ids[i, : len(p.response_ids)] = torch.tensor(p.response_ids)
        response_mask[i, : len(p.response_ids)] = 1
    # When scored at temperature 1 and 0.7
    with torch.no_grad():
        out = response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask)
        hot = response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=0.7)
    # Then [batch, T] column t is log π(a_t | s_t), equal to scoring each sequence alone
    assert out.logprobs.shape == (len(pairs), width) and out.values is None
    assert out.logits.shape == (len(pairs), width, model.config.vocab_size)
    for i, p in enumerate(pairs):
        n = len(p.response_ids)
        torch.testing.assert_close(out.logprobs[i, :n].double(), _alone_logprobs(model, p), atol=1e-5, rtol=0)
    expected_hot = (out.logits.double() / 0.7).log_softmax(-1).gather(-1, response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(hot.logprobs.double(), expected_hot, atol=1e-5, rtol=0)


def test_response_forward_with_value_head_returns_values_of_the_state_before_each_token(tiny_model_dir, pairs):
    # Given the actor-critic and a rollout-layout batch
    policy = PolicyWithValueHead.from_pretrained(tiny_model_dir).eval()
    prompt_ids, prompt_mask = left_pad_prompts([p.prompt_ids for p in pairs], pad_id=0)
    width = max(len(p.response_ids) for p in pairs)
    response_ids = torch.zeros(len(pairs), width, dtype=torch.long)
    response_mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for i, p in enumerate(pairs):
        response_ids[i, : len(p.response_ids)] = torch.tensor(p.response_ids)
        response_mask[i, : len(p.response_ids)] = 1
    with torch.no_grad():
        out = response_forward(policy, prompt_ids, prompt_mask, response_ids, response_mask)
        # Then values[:, t] = V(s_t): the value at the last token before response token t, scored alone
        for i, p in enumerate(pairs):
            _, values = policy(torch.tensor([p.prompt_ids + p.response_ids]))
            n_prompt, n = len(p.prompt_ids), len(p.response_ids)
            torch.testing.assert_close(out.values[i, :n], values[0, n_prompt - 1 : n_prompt - 1 + n], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                out.logprobs[i, :n].double(), _alone_logprobs(policy.pretrained_model, p), atol=1e-5, rtol=0
            )


def _shared_batch(prompt_pairs):
    """Prompts left-padded `[B, P]` and their responses right-padded `[B·n, R]`, prompt-major."""
    prompts = [group[0].prompt_ids for group in prompt_pairs]
    responses = [pair.response_ids for group in prompt_pairs for pair in group]
    width, length = max(map(len, prompts)), max(map(len, responses))
    prompt_ids, prompt_mask = (
        torch.zeros(len(prompts), width, dtype=torch.long),
        torch.zeros(len(prompts), width, dtype=torch.long),
    )
    for i, ids in enumerate(prompts):
        prompt_ids[i, width - len(ids) :], prompt_mask[i, width - len(ids) :] = torch.tensor(ids), 1
    response_ids, response_mask = (
        torch.zeros(len(responses), length, dtype=torch.long),
        torch.zeros(len(responses), length, dtype=torch.long),
    )
    for i, ids in enumerate(responses):
        response_ids[i, : len(ids)], response_mask[i, : len(ids)] = torch.tensor(ids), 1
    return prompt_ids, prompt_mask, response_ids, response_mask


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_prompt_computed_once_gives_each_response_its_own_log_prob_and_gradient(tiny_model_dir, tiny_tokenizer, lora):
    """DPO's shared prompt: two responses per prompt attending to one prompt pass's KV cache get the log-prob and
    the gradient that each gets as its own unpadded sequence (prompts of different lengths, so padding is in
    play on both sides)."""
    import copy

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if lora:
        from rlhf_core.trainers.common import LoRAConfig, apply_lora

        base = apply_lora(base, LoRAConfig(r=4))
        # peft starts B at 0; move it so the adapters change the numbers and the test can see them
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    groups = [
        [
            encode_prompt_response(tiny_tokenizer, "Where is my order?", r)
            for r in ("It shipped yesterday.", "No idea, stop asking me about it.")
        ],
        [
            encode_prompt_response(tiny_tokenizer, "I was charged twice for the same pair of shoes last week.", r)
            for r in ("Sorry! I refunded the second charge.", "Ok.")
        ],
    ]
    twin = copy.deepcopy(base)
    # When the four log-probs are computed with the prompt once, and each alone as a whole sequence
    shared = shared_prompt_logprobs(base, *_shared_batch(groups))  # [2 prompts, 2 responses]
    alone = torch.stack([torch.stack([_alone_sum(twin, pair) for pair in group]) for group in groups])
    # Then the values agree to float rounding ...
    torch.testing.assert_close(shared, alone, atol=1e-4, rtol=1e-5)
    # ... and so do the gradients of a loss that weighs the four differently (as DPO's chosen − rejected does)
    weights = torch.tensor([[1.0, -1.0], [0.5, -2.0]])
    (shared * weights).sum().backward()
    (alone * weights).sum().backward()
    trained = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
    assert trained
    for (name, p), (_, q) in zip(trained, [(n, q) for n, q in twin.named_parameters() if q.requires_grad], strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)


def _alone_sum(model, pair) -> torch.Tensor:
    """log π(response | prompt) from one unpadded sequence, with gradient."""
    ids = torch.tensor([pair.prompt_ids + pair.response_ids])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    n = len(pair.prompt_ids)
    positions = torch.arange(n - 1, ids.shape[1] - 1)
    return logp[positions, ids[0, positions + 1]].sum()
