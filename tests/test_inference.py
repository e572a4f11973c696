"""Inference: a saved policy (value head beside it or not) loads as a plain causal LM, samples reproducibly with
nucleus sampling, and chats over several turns with the whole conversation as the prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_core.generation import SamplingConfig, generate
from rlhf_core.inference import chat_loop, generate_text, load_policy
from rlhf_core.models import VALUE_HEAD_FILE, PolicyWithValueHead

PROMPTS = [
    "Where is my order?",
    "Reset my password",
    [{"role": "user", "content": "Hi"}],
    "I want a refund",
    "The app crashes",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy shared cores two threads spin against each
    other (measured: 10× slower); restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ppo_style_dir(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """A policy saved the way PPO saves it: causal LM + value_head.safetensors + tokenizer."""
    path = tmp_path_factory.mktemp("policy")
    PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(tiny_model_dir), seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def policy(ppo_style_dir):
    return load_policy(ppo_style_dir)


def test_load_policy_reads_the_causal_lm_and_ignores_the_value_head(ppo_style_dir, tiny_model_dir, policy):
    model, tokenizer = policy
    assert (ppo_style_dir / VALUE_HEAD_FILE).is_file()
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not model.training and tokenizer.eos_token == "<|im_end|>"


def test_generate_text_is_nucleus_sampling_through_the_shared_sampler(policy):
    model, tokenizer = policy
    sampling = SamplingConfig(max_new_tokens=8, top_p=0.9, seed=5)
    # Given a seed, the same call gives the same texts, one per prompt, in order
    texts = generate_text(model, tokenizer, PROMPTS, sampling, batch_size=2)
    assert texts == generate_text(model, tokenizer, PROMPTS, sampling, batch_size=2)
    assert len(texts) == len(PROMPTS)
    # and batch k is exactly rlhf_core.generation's sample with seed + k
    batch_1 = generate(model, tokenizer, PROMPTS[2:4], SamplingConfig(max_new_tokens=8, top_p=0.9, seed=6))
    assert texts[2:4] == batch_1.texts


def test_chat_loop_keeps_the_history_and_obeys_commands(policy):
    model, tokenizer = policy
    # Greedy decoding: each answer is a deterministic function of the whole prompt
    sampling = SamplingConfig(max_new_tokens=12, do_sample=False)
    script = iter(["Where is my order?", "", "It is order 42.", "/reset", "Thanks", "/exit", "never read"])
    printed: list[str] = []
    # When a user types two turns, resets, types one more and exits
    history = chat_loop(
        model,
        tokenizer,
        sampling,
        input_fn=lambda _: next(script),
        output_fn=printed.append,
        system_prompt="You are a support agent.",
    )
    # Then the history holds the system prompt and the turn after the reset only, and "never read" was not read
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "Thanks" and next(script) == "never read"
    assert printed[2] == "(history cleared)" and len(printed) == 4
    # and the second answer was generated from the whole conversation, not from the last message alone
    first_turn = [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "Where is my order?"},
    ]
    second_turn = first_turn + [
        {"role": "assistant", "content": printed[0]},
        {"role": "user", "content": "It is order 42."},
    ]
    assert printed[0] == generate_text(model, tokenizer, [first_turn], sampling)[0].strip()
    assert printed[1] == generate_text(model, tokenizer, [second_turn], sampling)[0].strip()
    assert printed[1] != generate_text(model, tokenizer, [second_turn[-1:]], sampling)[0].strip()


def test_chat_loop_ends_at_end_of_input(policy):
    model, tokenizer = policy

    def closed(_: str) -> str:
        raise EOFError

    assert (
        chat_loop(model, tokenizer, SamplingConfig(max_new_tokens=4, seed=0), input_fn=closed, output_fn=lambda _: None)
        == []
    )
