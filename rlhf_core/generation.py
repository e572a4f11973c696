"""Batched sampling that returns ids, masks and the log-probs of the distribution it actually drew from.

A plain decoding loop over the KV cache rather than `model.generate`, so nothing can change the distribution
behind our back (a model's `generation_config` may carry repetition penalties, `min_length` or suppressed tokens):
the token at each step is drawn from exactly

    p(· | s_t) = softmax(filter(logits_t / temperature))            (top-k, then top-p; filtered tokens get -inf)

and `logprobs[:, t] = log p(a_t | s_t)` of that same distribution (docs/pitfalls.md §1). With temperature 1 and no
filtering this is the policy itself, so rollout log-probs equal a fresh forward pass (`logprobs.response_forward`).

Layout (that of `logprobs.response_forward`): prompts left-padded `[batch, P]`; responses right-padded `[batch, T]`
with the pad id, `response_mask` 1 on generated tokens up to and including the EOS that ended the row. A row stops
at its first EOS (the tokenizer's eos, the chat template's end-of-turn token, or any of the model's
`generation_config.eos_token_id`); nothing forbids an early EOS.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf_core.models import PolicyWithValueHead, unwrap_peft
from rlhf_core.tokenization import (
    Conversation,
    encode_prompt,
    end_of_turn_text,
    left_pad_prompts,
    padding_id,
    position_ids_from_attention_mask,
)

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache` (the old name is
# deprecated there and goes in 5.40); use whichever the installed version has.
CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled."""

    max_new_tokens: int | Literal["auto"] = 64
    """Hard cap on response length; a row that reaches it without EOS has `ended_with_eos = False` ("auto":
    from the data's response lengths, resolved by the pipeline, `rlhf_core.lengths`)."""
    temperature: float = 1.0
    """Logits are divided by this before filtering and sampling (and the log-probs describe that distribution)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches `top_p` (1 = off)."""
    top_k: int = 0
    """Keep only the `top_k` most likely tokens (0 = off)."""
    do_sample: bool = True
    """False: greedy (argmax of the filtered logits); log-probs are still those of the filtered distribution."""
    seed: int | None = None
    """Seed of a private generator for the draws (None: the global torch RNG)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16`: decode under bfloat16 autocast, ~1.5× the float32 rate on a CPU with bf16 matmuls (measured in
    `bench/decode.py`). The log-probs are then those of the bf16 forward that drew the tokens. A trainer's
    rollouts follow its own `mixed_precision` instead."""

    def __post_init__(self) -> None:
        if self.max_new_tokens != "auto" and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")


@dataclass
class GenerationOutput:
    """A batch of sampled responses. `P` = longest prompt, `T` = longest response."""

    prompt_ids: torch.Tensor
    """`[batch, P]` left-padded prompt ids."""
    prompt_attention_mask: torch.Tensor
    """`[batch, P]` 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """`[batch, T]` sampled ids, right-padded with the pad id."""
    response_mask: torch.Tensor
    """`[batch, T]` 1 on sampled tokens including the EOS that ended the row, 0 after."""
    logprobs: torch.Tensor
    """`[batch, T]` float32 `log p(a_t | s_t)` under the sampling distribution; 0 where the mask is 0."""
    ended_with_eos: torch.Tensor
    """`[batch]` bool: the row stopped on an EOS (False: cut by `max_new_tokens`)."""
    texts: list[str]
    """Decoded responses, special tokens skipped."""
    values: torch.Tensor | None = None
    """`[batch, T]` float32 V(s_t) of a value head on the sampler's own final hidden states (`generate(...,
    values=True)` with a `PolicyWithValueHead`: the critic shares the body); 0 where the mask is 0; else None."""


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`[batch, V]` logits → float32 `logits / temperature` with tokens outside top-k / top-p set to -inf.

    `log_softmax` of the result is the sampling distribution, renormalised over the kept tokens. This is the
    definition, over the whole vocabulary: top-k keeps every token tied with the k-th; top-p's order among exactly
    tied logits is the sort's. `sample` uses `candidate_logits`, the same distribution on a short window.
    """
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # Drop a token once the more likely ones already hold top_p of the mass; the first is always kept.
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


NUCLEUS_WINDOW = 256
"""Top-p is first tried on the most likely 256 tokens: a trained LM's nucleus is almost always inside them."""


def candidate_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`filter_logits`'s distribution on as few tokens as it needs: `([batch, C] filtered logits, [batch, C] their
    token ids)`, or `([batch, V] filtered logits, None)` when every token is a candidate.

    Why: sorting the whole vocabulary for top-p costs more than the LM head at batch 16 on a CPU (SmolLM2's 49k
    tokens: ~57 ms against ~25 ms per step). `topk` of a window of W tokens is cheap, and exact whenever
    - top-k: the window reaches past every token tied with the k-th (`filter_logits` keeps ties, as do
      transformers' warpers; bf16 logits tie often);
    - top-p: the window already holds `top_p` of the mass, so every token outside it has at least that much mass
      before it and is dropped.
    Otherwise (a flat distribution, a tie running past the window) the whole batch takes `filter_logits`.
    """
    vocab = logits.shape[-1]
    top_k = top_k if 0 < top_k < vocab else 0
    if top_p >= 1.0 and not top_k:
        return logits.float() / temperature, None
    size = max(top_k + 1, NUCLEUS_WINDOW)
    if size >= vocab // 4:  # a small vocabulary (or a wide top-k) sorts in no time
        return filter_logits(logits, temperature, top_k, top_p), None
    scaled = logits.float() / temperature
    window, ids = torch.topk(scaled, size, dim=-1)  # [batch, W], most likely first
    if top_k:
        kth = window[:, top_k - 1 : top_k]
        if bool((window[:, -1:] >= kth).any()):  # a tie with the k-th may continue outside the window
            return filter_logits(logits, temperature, top_k, top_p), None
        window = window.masked_fill(window < kth, float("-inf"))
    if top_p < 1.0:
        # Mass is measured against what top-k kept (the whole vocabulary when top-k is off).
        log_total = (window if top_k else scaled).logsumexp(-1, keepdim=True)
        probs = (window - log_total).exp()
        mass_before = probs.cumsum(-1) - probs
        if not top_k and not bool((mass_before[:, -1] + probs[:, -1] >= top_p).all()):
            return filter_logits(logits, temperature, 0, top_p), None
        window = window.masked_fill(mass_before >= top_p, float("-inf"))
    return window, ids


def draw(log_p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `[batch, C]` log-probabilities, drawn with probability `exp(log_p)` (`[batch]`).

    `torch.multinomial` on the candidates: cheap on a top-p window. (The Gumbel-max trick would also be ~3× faster
    over a whole 49k vocabulary, but changes every seeded sample the pipeline and its tests have recorded.)
    Filtered tokens (-inf, probability 0) are never drawn; a NaN (a diverged model) stops the run, checked by
    `multinomial` itself rather than by a second pass over the logits at every step.
    """
    try:
        return torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(-1)
    except RuntimeError as error:
        if not bool(torch.isnan(log_p).any()):
            raise
        raise FloatingPointError(
            "the sampling distribution contains NaN: the model's logits are not finite (diverged weights, or an "
            "fp16 overflow); lower the learning rate or use bf16 / fp32"
        ) from error


def _eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn_text(tokenizer))}
    configured = getattr(getattr(unwrap_peft(model), "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


@contextmanager
def _lm_head_input(model: nn.Module, enabled: bool) -> Iterator[dict[str, torch.Tensor]]:
    """While open, `["hidden"]` holds the input of `model`'s LM head at its latest forward: the final hidden state
    of the positions whose logits are computed (`[batch, 1, H]` in `sample`: the prompt pass keeps one position,
    each decode step has one). A forward pre-hook, so no per-layer hidden-state tuples are built."""
    head_input: dict[str, torch.Tensor] = {}
    if not enabled:
        yield head_input
        return
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: head_input.__setitem__("hidden", args[0])
    )
    try:
        yield head_input
    finally:
        handle.remove()


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    config: SamplingConfig,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    value_head: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decode from left-padded prompts `[batch, P]` with the KV cache.

    `model` is a causal LM (peft-wrapped or not) — not the value-head wrapper. Returns `(response_ids,
    response_mask, logprobs, ended_with_eos, values)` as in `GenerationOutput`, with `T` = steps actually taken.
    `value_head` (the head of a critic sharing `model`'s body): V(s_t) from the final hidden state that gives
    a_t's logits, the same state a full forward pass over prompt + response would read; else `values` is None.
    """
    with _lm_head_input(model, value_head is not None) as head_input:
        device = prompt_ids.device
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=device).manual_seed(config.seed)
        eos = torch.tensor(list(eos_token_ids), device=device)
        attention_mask = prompt_attention_mask.long()
        prompt_positions = position_ids_from_attention_mask(attention_mask)  # [batch, P]
        # Only the last position's logits are needed: skip the [batch, P, V] projection of the prompt.
        out = model(
            input_ids=prompt_ids,
            attention_mask=attention_mask,
            position_ids=prompt_positions,
            use_cache=True,
            logits_to_keep=1,
        )
        positions = prompt_positions[:, -1:]  # [batch, 1], advanced by one per generated token
        finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=device)
        tokens, masks, logprobs, values = [], [], [], []
        for _ in range(config.max_new_tokens):
            # [batch, C]: the filtered logits of the candidate tokens (C = V when nothing is filtered)
            logits, candidate_ids = candidate_logits(out.logits[:, -1], config.temperature, config.top_k, config.top_p)
            log_p = logits.log_softmax(-1)
            choice = draw(log_p, generator) if config.do_sample else logits.argmax(-1)  # [batch], index into C
            token = choice if candidate_ids is None else candidate_ids.gather(-1, choice[:, None]).squeeze(-1)
            alive = ~finished
            tokens.append(torch.where(alive, token, torch.full_like(token, pad_token_id)))
            masks.append(alive.long())
            chosen = log_p.gather(-1, choice[:, None]).squeeze(-1)
            logprobs.append(torch.where(alive, chosen, torch.zeros_like(chosen)))
            if value_head is not None:  # the state s_t before a_t: the position whose logits drew a_t
                value = value_head(head_input["hidden"][:, -1].float()).squeeze(-1).float()
                values.append(torch.where(alive, value, torch.zeros_like(value)))
            finished = finished | (alive & torch.isin(token, eos))
            if finished.all():
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            positions = positions + 1
            out = model(
                input_ids=tokens[-1][:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                **{CACHE_ARG: getattr(out, CACHE_ARG)},
                use_cache=True,
            )
        stacked_values = torch.stack(values, 1) if value_head is not None else None
        return torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logprobs, 1), finished, stacked_values


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Conversation],
    config: SamplingConfig,
    max_prompt_len: int | None = None,
    values: bool = False,
) -> GenerationOutput:
    """Sample one response per prompt (strings or message lists, rendered by `tokenization.render_prompt`).

    Works with a `PolicyWithValueHead` (its body generates) or any causal LM. The model runs in eval mode (no
    dropout) and is put back in its previous mode afterwards. `values=True` (a `PolicyWithValueHead` only): also
    V(s_t) of every sampled state from the same decode steps, so PPO needs no critic pass over the rollout.
    """
    if values and not isinstance(model, PolicyWithValueHead):
        raise ValueError(f"values=True needs a PolicyWithValueHead (a critic sharing the body), got {type(model)}")
    if config.max_new_tokens == "auto" or max_prompt_len == "auto":
        raise ValueError(
            "max_new_tokens / max_prompt_len 'auto' must be resolved from the data before sampling "
            "(rlhf_core.lengths.resolve_lengths; the pipeline does) or set to integers"
        )
    body = model.pretrained_model if isinstance(model, PolicyWithValueHead) else model
    pad_id = padding_id(tokenizer)
    device = next(body.parameters()).device
    prompt_ids, prompt_mask = left_pad_prompts([encode_prompt(tokenizer, p, max_prompt_len) for p in prompts], pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = body.training
    body.eval()
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext()
    try:
        with precision:
            response_ids, response_mask, logprobs, ended, state_values = sample(
                body,
                prompt_ids,
                prompt_mask,
                config,
                _eos_token_ids(body, tokenizer),
                pad_id,
                value_head=model.value_head if values else None,
            )
    finally:
        body.train(was_training)
    texts = [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(response_ids, response_mask, strict=True)
    ]
    return GenerationOutput(
        prompt_ids=prompt_ids,
        prompt_attention_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=logprobs,
        ended_with_eos=ended,
        texts=texts,
        values=state_values,
    )
