"""Shared-prefix packing (rlhf_core.packing): the layout by hand, and the log-probs and gradients of a packed row
against each response computed alone as its own unpadded sequence."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rlhf_core.packing import (
    MAX_PACKED_TOKENS,
    pack_fits,
    pack_groups,
    packable,
    packable_config,
    packed_attention_mask,
    packed_logprobs,
)
from rlhf_core.tokenization import encode_prompt_response


def test_a_packed_row_lays_out_ids_positions_and_predictors_as_worked_by_hand():
    """Prompt [11, 12] with responses [21, 22] and [31]; prompt [13] with [23] and [32, 33].

    Row:        11 12 21 22 31 | 13 23 32 33
    column:      0  1  2  3  4 |  5  6  7  8
    positions:   0  1  2  3  2 |  0  1  1  2     (each response continues from its prompt's length)
    Predictors: 21 ← col 1 (prompt's last), 22 ← col 2; 31 ← col 1; 23 ← col 5; 32 ← col 5, 33 ← col 7.
    keep = [1, 2, 5, 7]; label_rows index keep.
    """
    packed = pack_groups([[11, 12], [13]], [[[21, 22], [31]], [[23], [32, 33]]])
    assert packed["input_ids"].tolist() == [[11, 12, 21, 22, 31, 13, 23, 32, 33]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert packed["keep"].tolist() == [1, 2, 5, 7]
    assert packed["labels"].tolist() == [21, 22, 31, 23, 32, 33]
    assert packed["label_rows"].tolist() == [0, 1, 0, 2, 2, 3]
    assert packed["label_response"].tolist() == [0, 0, 1, 2, 3, 3]

    allowed = packed_attention_mask(packed["group"], packed["part"])[0, 0]
    # Query 4 (response [31]) sees its prompt (0, 1) and itself, not the other response (2, 3).
    assert allowed[4].nonzero().flatten().tolist() == [0, 1, 4]
    # Query 3 (token 22) sees its prompt and its own earlier token; query 8 (33) sees prompt 5 and 32 (col 7).
    assert allowed[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert allowed[8].nonzero().flatten().tolist() == [5, 7, 8]
    # Nothing crosses from the second prompt's group to the first.
    assert not allowed[5:, :5].any()


def _config(model_type: str, attention: str = "sdpa", **fields) -> object:
    config = AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = attention
    return config


def test_packing_is_used_only_where_the_model_computes_a_packed_row_exactly_and_the_row_is_short():
    """Fails closed: sdpa only (eager keeps N² probabilities, flash attention takes no mask), full attention in every
    layer (a sliding window or a recurrent layer would see across pairs), and no empty prompt."""
    assert packable_config(_config("llama")) and packable_config(_config("gpt2"))
    assert packable_config(_config("qwen2", sliding_window=4096, use_sliding_window=False))
    assert not packable_config(_config("llama", "eager"))
    assert not packable_config(_config("llama", "flash_attention_2"))
    assert not packable_config(_config("mistral", sliding_window=4096))
    assert not packable_config(_config("qwen2", sliding_window=4096, use_sliding_window=True))
    assert not packable_config(
        _config("llama", num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    )
    assert not packable_config(_config("bloom"))  # ALiBi, not in the checked list
    assert not packable_config(None)
    assert pack_fits([[1]], MAX_PACKED_TOKENS, True)
    assert not pack_fits([[1]], MAX_PACKED_TOKENS + 1, True)
    assert not pack_fits([[1], []], 10, True)
    assert not pack_fits([[1]], 10, False)


def test_a_packed_forward_refuses_a_model_it_cannot_vouch_for(tiny_model_dir):
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    assert not packable(eager)
    with pytest.raises(ValueError, match="packed rows need an sdpa model"):
        packed_logprobs(eager, pack_groups([[1, 2]], [[[3]]]), 1)


def _alone_sum(model, prompt_ids, response_ids) -> torch.Tensor:
    """log π(response | prompt) from one unpadded sequence with no mask, with gradient."""
    ids = torch.tensor([prompt_ids + response_ids])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logp[positions, ids[0, positions + 1]].sum()


GROUPS = [
    ("Where is my order?", ["It shipped yesterday.", "No idea, stop asking me about it.", "Friday."]),
    ("I was charged twice for the same pair of shoes last week.", ["Sorry! I refunded the second charge.", "Ok.", "?"]),
]


def _tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    """Learned absolute position embeddings (the other kind `packing` vouches for), built from config."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("model_kind", ["llama", "llama-lora", "gpt2"])
def test_a_packed_row_gives_each_response_its_own_log_prob_and_gradient(tiny_model_dir, tiny_tokenizer, model_kind):
    """Three responses per prompt, two prompts of different lengths, in one packed row: each response's log-prob
    and the gradient of a loss that weighs them differently match those of six separate unpadded sequences."""
    if model_kind == "gpt2":
        base = _tiny_gpt2(len(tiny_tokenizer)).eval()
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert packable(base)
    if model_kind == "llama-lora":
        from rlhf_core.trainers.common import LoRAConfig, apply_lora

        base = apply_lora(base, LoRAConfig(r=4))
        with torch.no_grad():  # peft starts B at 0; move it so the adapters change the numbers
            for name, p in base.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    encoded = [[encode_prompt_response(tiny_tokenizer, prompt, r) for r in answers] for prompt, answers in GROUPS]
    twin = copy.deepcopy(base)

    packed = pack_groups([g[0].prompt_ids for g in encoded], [[pair.response_ids for pair in g] for g in encoded])
    logps = packed_logprobs(base, packed, 6).view(2, 3)
    alone = torch.stack([torch.stack([_alone_sum(twin, p.prompt_ids, p.response_ids) for p in g]) for g in encoded])
    torch.testing.assert_close(logps, alone, atol=1e-4, rtol=1e-5)

    weights = torch.tensor([[1.0, -1.0, 0.25], [0.5, -2.0, 3.0]])
    (logps * weights).sum().backward()
    (alone * weights).sum().backward()
    trained = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
    twins = [q for _, q in twin.named_parameters() if q.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)
    for (name, p), q in zip(trained, twins, strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
