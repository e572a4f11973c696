"""Per-token and per-sequence log-probs of given response tokens under a model.

Alignment. A causal LM's logits at position `t` predict token `t + 1`, so over a whole sequence `[batch, L]`
the log-probs are `[batch, L - 1]`:

    logprobs[:, t] = log π(input_ids[:, t + 1] | input_ids[:, :t + 1])      (column t scores token t + 1)

and the matching mask is `response_mask[:, 1:]`. Over response tokens (`[batch, T]`, the convention of the
trainers), with prompts of width `P` in front, response token `t` sits at sequence column `P + t`, its log-prob
at column `P - 1 + t`, and the value of the state before it, `V(s_t)`, at hidden state `P - 1 + t`.

Numerics: `log π(y) = z_y - logsumexp(z)` computed in float32 (bf16 logits lose too much over a 50k vocabulary).
Temperature divides the logits first, so log-probs describe the same distribution the sampler drew from.
Position ids come from the attention mask, so left- and right-padded batches give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from rlhf_core.tokenization import position_ids_from_attention_mask

# transformers renamed the KV-cache argument and output `past_key_values` → `cache` (5.2x); both are accepted here.
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shifted per-token log-probs: `[batch, L, V]` logits and `[batch, L]` labels → `[batch, L - 1]` float32.

    `out[:, t] = log softmax(logits[:, t] / temperature)[labels[:, t + 1]]`.
    """
    return gather_logprobs(logits[:, :-1], labels[:, 1:], temperature)


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Unshifted: `logits[..., V]` and `labels[...]` of the same leading shape → `log softmax(logits/τ)[label]`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    # z_y - logsumexp(z) equals log_softmax(z)[y] without materialising a second [batch, L, V] tensor.
    return picked - torch.logsumexp(logits, dim=-1)


def _forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(logits [batch, L or logits_to_keep, V], values [batch, L] or None)` from a causal LM or a
    `PolicyWithValueHead`; `logits_to_keep > 0` projects only the last positions onto the vocabulary."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
        logits_to_keep=logits_to_keep,
    )
    if isinstance(out, tuple):  # PolicyWithValueHead returns (logits, values) from one forward pass
        return out[0], out[1]
    return out.logits, None


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every next token and the mask of those that are response tokens.

    Inputs `[batch, L]` (any padding side). Returns `(logprobs, mask)`, both `[batch, L - 1]`: column `t` is
    `log π(input_ids[:, t+1] | ≤ t)`, `mask = response_mask[:, 1:]`. The single helper every trainer uses.
    """
    logits, _ = _forward(model, input_ids, attention_mask)
    return token_logprobs(logits, input_ids, temperature), response_mask[:, 1:]


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`log π(response | prompt) = Σ_t log π(a_t | s_t)` over response tokens: `[batch]` float32 (DPO's input)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    width = input_ids.shape[1]
    # Only positions from the earliest response token on need vocabulary logits: for DPO's long prompts the
    # [batch, L, V] float32 tensor over prompt positions is most of the step's memory and a good part of its time.
    has_response = response_mask.bool().any(dim=1)
    first = torch.where(
        has_response, response_mask.int().argmax(dim=1), torch.zeros_like(has_response, dtype=torch.long)
    )
    keep = width - max(int(first.min().item()) - 1, 0)
    logits, _ = _forward(model, input_ids, attention_mask, logits_to_keep=keep)
    logits = logits[:, :-1].float()  # [batch, keep - 1, V]: column j predicts token width - keep + 1 + j
    if temperature != 1.0:
        logits = logits / temperature
    labels = input_ids[:, width - keep + 1 :]
    mask = response_mask[:, width - keep + 1 :].bool()
    # cross_entropy's fused log-softmax + gather avoids a second [batch, keep, V] temporary.
    logprobs = -F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [batch, keep - 1]
    return torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(-1)


@dataclass
class ResponseForward:
    """One forward pass over `prompt + response`, sliced to response coordinates `[batch, T]`.

    `logprobs[:, t] = log π(a_t | s_t)` (float32, at the given temperature); `logits[:, t]` the temperature-scaled
    float32 logits that produced it `[batch, T, V]` (for entropy); `values[:, t] = V(s_t)` when the model has a
    value head, else None.
    """

    logprobs: torch.Tensor
    logits: torch.Tensor
    values: torch.Tensor | None


def response_forward(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> ResponseForward:
    """Score rollout responses: left-padded prompts `[batch, P]` + right-padded responses `[batch, T]`.

    This is the PPO helper (policy log-probs and values in one forward, reference log-probs, entropy); the layout
    is exactly that of `generation.GenerationOutput`. Response pads (mask 0) are excluded from attention.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    width = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_attention_mask, response_mask.to(prompt_attention_mask.dtype)], dim=1)
    # The state before response token t ends at sequence column P - 1 + t: only the last T + 1 positions need
    # logits (a [batch, P + T, V] float32 tensor would dominate memory for long prompts and large vocabularies).
    logits, values = _forward(model, input_ids, attention_mask, logits_to_keep=response_ids.shape[1] + 1)
    logits = logits[:, :-1].float()  # [batch, T, V]
    if temperature != 1.0:  # skip a [batch, T, V] copy in the common case
        logits = logits / temperature
    logprobs = gather_logprobs(logits, response_ids)
    return ResponseForward(
        logprobs=logprobs,
        logits=logits,
        values=None if values is None else values[:, width - 1 : -1],
    )


def shared_prompt_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """`log π(y_j | x_b) = Σ_t log π(a_t | s_t)` `[B, n]` for `n` responses per prompt, the prompt computed ONCE.

    Inputs: prompts `[B, P]` left-padded; responses `[B·n, R]` right-padded, prompt-major (rows `b·n … b·n + n − 1`
    answer prompt `b`). The prompt runs once with the KV cache on; the cache is repeated `n` times and the
    responses attend to it, so gradients reach the prompt's activations through its keys and values exactly as in
    one forward over `prompt + response` (the numbers agree to float rounding, tests/test_logprobs.py). For DPO's
    pairs (`n = 2`) this saves one of the two prompt passes: on the bundled task 59% of the tokens are prompt.

    Token `a_0` is predicted by the prompt's last position, `a_t` (t ≥ 1) by response position `t − 1`.
    """
    batch, n = prompt_ids.shape[0], response_ids.shape[0] // prompt_ids.shape[0]
    if batch * n != response_ids.shape[0]:
        raise ValueError(f"{response_ids.shape[0]} responses for {batch} prompts: need the same n for each")
    prompt_positions = position_ids_from_attention_mask(prompt_mask)
    prompt_out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=prompt_positions,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(prompt_out, _CACHE)
    cache.batch_repeat_interleave(n)
    prompt_len = prompt_mask.sum(1, keepdim=True).repeat_interleave(n, 0)  # [B·n, 1]
    width = response_ids.shape[1]
    out = model(
        input_ids=response_ids,
        attention_mask=torch.cat([prompt_mask.repeat_interleave(n, 0), response_mask], 1),
        position_ids=prompt_len + torch.arange(width, device=response_ids.device),
        use_cache=False,
        **{_CACHE: cache},
    )
    # [B·n, R, V]: the prompt's last logits (predicting a_0), then response positions 0 … R − 2.
    logits = torch.cat([prompt_out.logits[:, -1:].repeat_interleave(n, 0), out.logits[:, :-1]], 1).float()
    logprobs = -F.cross_entropy(logits.transpose(1, 2), response_ids, reduction="none")  # [B·n, R]
    logprobs = torch.where(response_mask.bool(), logprobs, torch.zeros_like(logprobs))
    return logprobs.sum(-1).view(batch, n)
