"""Prompts and responses become ids in one place: chat template, separate tokenisation, truncation, padding."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_core.tokenization import (
    EncodedPair,
    collate_right_padded,
    encode_prompt,
    encode_prompt_response,
    end_of_turn_text,
    left_pad_prompts,
    position_ids_from_attention_mask,
    render_prompt,
    render_response,
)

PROMPT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "My parcel is late."}]
RESPONSE = [{"role": "assistant", "content": "Sorry! Let me check the tracking for you."}]


def test_tiny_tokenizer_round_trips_any_text(tiny_tokenizer):
    # Given text with unicode, digits, tabs and emoji (byte-level BPE has no unknown token)
    texts = ["Hello, world!", "refund #12345\tnow", "Grüße — ça va? 🙂", "  leading spaces", ""]
    for text in texts:
        # When encoded and decoded, then the text comes back unchanged
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_special_tokens_are_distinct(tiny_tokenizer):
    ids = {tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.bos_token_id}
    assert len(ids) == 3
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert end_of_turn_text(tiny_tokenizer) == tiny_tokenizer.eos_token


def test_chat_prompt_ends_with_generation_prompt_and_response_with_end_of_turn(tiny_tokenizer):
    # When rendered separately
    prompt_text = render_prompt(tiny_tokenizer, PROMPT)
    response_text = render_response(tiny_tokenizer, RESPONSE)
    # Then the prompt hands over to the assistant and the response closes the turn with EOS
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert response_text == "Sorry! Let me check the tracking for you.<|im_end|>"
    # And together they are the template's rendering of the whole conversation (up to the turn separator)
    full = tiny_tokenizer.apply_chat_template(PROMPT + RESPONSE, tokenize=False)
    assert full == prompt_text + response_text + "\n"


def test_string_prompt_is_wrapped_as_one_user_message(tiny_tokenizer):
    as_string = render_prompt(tiny_tokenizer, "Where is my refund?")
    as_messages = render_prompt(tiny_tokenizer, [{"role": "user", "content": "Where is my refund?"}])
    assert as_string == as_messages


def test_without_chat_template_prompts_are_plain_text(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, "Q: where is it?\nA:") == "Q: where is it?\nA:"
    assert render_prompt(tokenizer, PROMPT) == "System: Be kind.\n\nUser: My parcel is late.\n\nAssistant:"
    assert render_response(tokenizer, " It ships today.") == " It ships today.<|im_end|>"


def test_end_of_turn_comes_from_the_template_not_eos(tiny_tokenizer):
    # Given a Qwen-like tokenizer: the template closes turns with <|im_end|> but eos_token is <|endoftext|>
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    # Then a response still ends with the template's end-of-turn token
    assert end_of_turn_text(tokenizer) == "<|im_end|>"
    assert render_response(tokenizer, "ok").endswith("<|im_end|>")


def test_response_must_be_one_assistant_message(tiny_tokenizer):
    with pytest.raises(ValueError, match="one assistant message"):
        render_response(tiny_tokenizer, [{"role": "user", "content": "hi"}])


def test_prompt_and_response_are_tokenised_separately(tiny_tokenizer):
    # When a pair is encoded
    pair = encode_prompt_response(tiny_tokenizer, PROMPT, RESPONSE)
    # Then each half is exactly its own tokenisation (the boundary cannot move), response ending with EOS
    prompt_text = render_prompt(tiny_tokenizer, PROMPT)
    response_text = render_response(tiny_tokenizer, RESPONSE)
    assert pair.prompt_ids == tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert pair.response_ids == tiny_tokenizer(response_text, add_special_tokens=False)["input_ids"]
    assert pair.response_ids[-1] == tiny_tokenizer.eos_token_id
    assert pair.prompt_ids[0] == tiny_tokenizer.bos_token_id  # written by the template, not prepended twice
    assert pair.prompt_ids.count(tiny_tokenizer.bos_token_id) == 3
    assert not pair.response_truncated


def test_truncation_keeps_prompt_end_and_response_start_without_fake_eos(tiny_tokenizer):
    full = encode_prompt_response(tiny_tokenizer, PROMPT, RESPONSE)
    # When both sides are truncated
    cut = encode_prompt_response(tiny_tokenizer, PROMPT, RESPONSE, max_prompt_len=5, max_response_len=4)
    # Then the prompt keeps its last tokens (the generation prompt survives) and the response its first ones
    assert cut.prompt_ids == full.prompt_ids[-5:]
    assert cut.response_ids == full.response_ids[:4]
    # And the cut response gets no EOS it never produced, but is flagged
    assert tiny_tokenizer.eos_token_id not in cut.response_ids
    assert cut.response_truncated
    # A limit that is not exceeded changes nothing
    exact = encode_prompt_response(tiny_tokenizer, PROMPT, RESPONSE, max_response_len=len(full.response_ids))
    assert exact == full
    assert encode_prompt(tiny_tokenizer, PROMPT, max_prompt_len=5) == cut.prompt_ids


def test_right_padded_collation_marks_response_tokens():
    pairs = [EncodedPair([5, 6, 7], [8, 9]), EncodedPair([5], [8, 9, 10, 11])]
    batch = collate_right_padded(pairs, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert batch["prompt_lengths"].tolist() == [3, 1]
    short = collate_right_padded([EncodedPair([5, 6], [8]), EncodedPair([5], [8, 9, 10])], pad_id=0)
    assert short["input_ids"].tolist() == [[5, 6, 8, 0], [5, 8, 9, 10]]
    assert short["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert short["response_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    assert short["position_ids"].tolist() == [[0, 1, 2, 2], [0, 1, 2, 3]]


def test_when_pad_equals_eos_the_real_eos_stays_in_the_response_mask(tiny_tokenizer):
    # Given a tokenizer whose pad token is its EOS (GPT-2/Llama style setups)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    short = encode_prompt_response(tokenizer, "Hi", "Hello!")
    long = encode_prompt_response(tokenizer, "Hi", "Hello, how can I help you today?")
    # When collated with pad = EOS
    batch = collate_right_padded([short, long], pad_id=tokenizer.pad_token_id)
    # Then the short row's EOS is inside its response mask, and the pads after it (same id) are not
    row = batch["input_ids"][0]
    end = len(short.prompt_ids) + len(short.response_ids)
    assert row[end - 1] == eos and (row[end:] == eos).all() and end < row.numel()
    assert batch["response_mask"][0, end - 1] == 1
    assert batch["response_mask"][0, end:].sum() == 0
    assert batch["response_mask"][0].sum() == len(short.response_ids)


def test_left_padding_for_generation():
    input_ids, attention_mask = left_pad_prompts([[4, 5, 6], [7]], pad_id=0)
    assert input_ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_attention_mask(attention_mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        left_pad_prompts([[1], []], pad_id=0)


def test_position_ids_match_unpadded_positions_on_both_sides():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    positions = position_ids_from_attention_mask(mask)
    assert positions[0, 2:].tolist() == [0, 1, 2]
    assert positions[1, :3].tolist() == [0, 1, 2]
