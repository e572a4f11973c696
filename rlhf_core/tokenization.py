"""The one place prompts and responses become token ids.

A prompt or a response is either a string or a list of `{"role", "content"}` messages (conversational rows).

Rendering:

- prompt, tokenizer with a chat template: the template with `add_generation_prompt=True` (a plain string is
  wrapped as one user message), so the prompt text ends where the assistant's first token goes;
- prompt, no chat template: a plain string as is; messages as `"{Role}: {content}\\n\\n"` lines ending with
  `"Assistant:"`;
- response: the assistant content followed by the end-of-turn text (the token that closes an assistant turn in
  the chat template, else `eos_token`). The model learns to stop because the end-of-turn token is a target.

Tokenisation boundary (docs/pitfalls.md §7): prompt and response are tokenised *separately* and concatenated, so the
prompt length that defines `response_mask` is exact and identical in SFT, RM, DPO and PPO. Templates carry their
own BOS, so a templated prompt is encoded with `add_special_tokens=False`; the response always is.

Truncation: the prompt keeps its *last* `max_prompt_len` tokens (the end is what the response answers); the
response keeps its *first* `max_response_len` tokens. A truncated response does **not** get a fake EOS: it did
not end, and teaching the model to stop mid-sentence (or scoring it as finished) would be wrong.
`EncodedPair.response_truncated` says so, for the callers that count or penalise unfinished responses.

Padding (docs/pitfalls.md §4): generation left-pads prompts; training right-pads whole sequences. Masks come from lengths,
never from `ids != pad_id`, so when pad == EOS the real EOS stays in `response_mask`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
Conversation = Union[str, list[Message]]  # noqa: UP007 - a runtime alias, must work on Python 3.10

_SENTINEL = "\x00RLHF_RESPONSE\x00"


@dataclass(frozen=True)
class EncodedPair:
    """A prompt and its response as separate token-id lists (`prompt_ids + response_ids` is the sequence)."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_truncated: bool = False


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (masks come from lengths, never from ids, so
    pad == EOS is safe, docs/pitfalls.md §4)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_of(row: Conversation | Mapping[str, Any]) -> Conversation:
    """The prompt of a `{"prompt"}` row (or the prompt itself)."""
    return row["prompt"] if isinstance(row, Mapping) else row


def default_device(device: torch.device | str | None = None) -> torch.device:
    """`device` as a `torch.device`; None: the first CUDA device when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_messages(x: Conversation) -> bool:
    return isinstance(x, list)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Conversation) -> str:
    """The prompt as text, ending exactly where the response's first token goes."""
    if tokenizer.chat_template:
        messages = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not _is_messages(prompt):
        return prompt
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in prompt)
    return turns + "Assistant:"


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token that closes an assistant turn.

    Found by rendering a one-exchange conversation through the chat template and taking the first special token
    after the assistant content (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma).
    Falls back to `eos_token` without a chat template or when the template writes no special token there.
    """
    if tokenizer.chat_template:
        conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        after = rendered.split(_SENTINEL, 1)[-1] if _SENTINEL in rendered else ""
        special = [t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t and t in after]
        if special:
            return min(special, key=after.index)
    if tokenizer.eos_token is None:
        raise ValueError("tokenizer has neither a chat template with an end-of-turn token nor an eos_token")
    return tokenizer.eos_token


def _response_content(response: Conversation) -> str:
    if not _is_messages(response):
        return response
    if len(response) != 1 or response[0]["role"] != "assistant":
        raise ValueError(f"a conversational response must be exactly one assistant message, got {response!r}")
    return response[0]["content"]


def render_response(tokenizer: PreTrainedTokenizerBase, response: Conversation) -> str:
    """The assistant content followed by the end-of-turn text (see `end_of_turn_text`)."""
    return _response_content(response) + end_of_turn_text(tokenizer)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Conversation, max_prompt_len: int | None = None
) -> list[int]:
    """Token ids of the rendered prompt, keeping the last `max_prompt_len` tokens."""
    text = render_prompt(tokenizer, prompt)
    # A chat template writes its own BOS; plain text gets the tokenizer's usual special tokens.
    ids = tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    if max_prompt_len is not None:
        if max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        ids = ids[-max_prompt_len:]
    return list(ids)


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Conversation,
    response: Conversation,
    max_prompt_len: int | None = None,
    max_response_len: int | None = None,
) -> EncodedPair:
    """Encode prompt and response separately; truncate the prompt from the left, the response from the right.

    The response ids end with the end-of-turn token unless truncation cut it (`response_truncated=True`).
    """
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_len)
    response_ids = list(tokenizer(render_response(tokenizer, response), add_special_tokens=False)["input_ids"])
    truncated = False
    if max_response_len is not None:
        if max_response_len < 1:
            raise ValueError(f"max_response_len must be >= 1, got {max_response_len}")
        truncated = len(response_ids) > max_response_len
        response_ids = response_ids[:max_response_len]
    return EncodedPair(prompt_ids=prompt_ids, response_ids=response_ids, response_truncated=truncated)


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... over the real tokens of each row, whatever side the padding is on.

    `attention_mask` `[batch, L]` → `[batch, L]` long. The first real token gets position 0, as it would unpadded;
    left pads get 0 and right pads repeat the last position (both are masked out, any in-range value would do).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def collate_right_padded(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `prompt_ids + response_ids` sequences into a training batch.

    Returns (all `[batch, L]` with `L = max(len(prompt) + len(response))`, except `prompt_lengths` `[batch]`):
    `input_ids` (pad = `pad_id`), `attention_mask`, `response_mask` (1 on response tokens in full-sequence
    coordinates, the final EOS included even when it equals `pad_id`), `position_ids`, `prompt_lengths`.
    """
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    length = max(len(p.prompt_ids) + len(p.response_ids) for p in pairs)
    batch = len(pairs)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, pair in enumerate(pairs):
        n_prompt, n_total = len(pair.prompt_ids), len(pair.prompt_ids) + len(pair.response_ids)
        input_ids[i, :n_total] = torch.tensor(pair.prompt_ids + pair.response_ids, dtype=torch.long)
        attention_mask[i, :n_total] = 1
        response_mask[i, n_prompt:n_total] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "position_ids": position_ids_from_attention_mask(attention_mask),
        "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs], dtype=torch.long),
    }


def left_pad_prompts(prompt_ids_list: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: `(input_ids, attention_mask)`, both `[batch, P]`, P = longest prompt."""
    if not prompt_ids_list:
        raise ValueError("cannot pad an empty batch")
    length = max(len(ids) for ids in prompt_ids_list)
    input_ids = torch.full((len(prompt_ids_list), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids_list), length), dtype=torch.long)
    for i, ids in enumerate(prompt_ids_list):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty")
        input_ids[i, length - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, length - len(ids) :] = 1
    return input_ids, attention_mask
