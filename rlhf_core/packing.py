"""Shared-prefix packing: a micro-batch of prompts, each with several responses, as ONE row with no padding.

Why. A padded batch pays for every pad: on the bundled preference task the 8 responses of a micro-batch of 4
pairs are padded to the longest, and a third of all token slots are pads (chosen and rejected lengths differ a
lot). Packing lays the pairs end to end,

    [ x_1  y_1,1  y_1,2 | x_2  y_2,1  y_2,2 | … ]          one row [1, N], N = Σ_b (|x_b| + Σ_j |y_b,j|)

and a block attention mask keeps every token seeing exactly what it would see in `x_b + y_b,j` alone:

    token i may attend token k  ⟺  same group b,  k ≤ i,  and (k is a prompt token or k is in i's own response)

Position ids restart per group and each response's positions continue from its prompt's length, so rotary and
learned absolute position embeddings give the numbers of the unpacked sequences (to float rounding; Llama and
GPT-2 in tests/test_packing.py). The prompt is computed once for all its responses, as with
`logprobs.shared_prompt_logprobs`, and only the positions that predict a response token are projected onto the
vocabulary (`logits_to_keep` as an index tensor).

When it applies (`pack_fits`, which fails closed: a model it cannot vouch for gets the padded layout):
- sdpa attention. Flash-attention kernels take no custom mask; eager attention would keep heads × N² attention
  probabilities per layer for the backward pass.
- a model whose every layer is full softmax attention over the mask it is given, with positions from
  `position_ids`: architectures listed in `PACKABLE_MODEL_TYPES`, and none with a sliding window, chunked
  attention, or per-layer types other than full attention. Transformers passes a custom 4D mask through
  unchanged, so a sliding-window layer would see the whole row, and a recurrent or convolutional layer
  (hybrid models) ignores the mask and would carry state from one pair into the next.
- a row of at most `MAX_PACKED_TOKENS` tokens, and no empty prompt.

Cost. Attention over the packed row is dense in N (the mask is applied, masked blocks are not skipped), so it
grows as N² while the matmuls grow as N. `MAX_PACKED_TOKENS` bounds N so the attention stays a small part of the
step; the callers' padded layouts take longer micro-batches (DPO: the prompt's KV cache shared by both responses;
the reward model: one right-padded batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_ATTENTION = ("sdpa",)
"""Attention implementations packing runs on: they take a custom boolean `[batch, 1, q, k]` mask and keep no N²
probabilities for the backward pass."""

PACKABLE_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo2", "phi3", "smollm3", "gpt2"}
)
"""`config.model_type`s whose layers are all full attention over the given mask with positions from `position_ids`
(rotary or learned absolute). Their sliding-window options are checked separately (`packable_config`)."""

MAX_PACKED_TOKENS = 2048
"""Longest packed row. At this length the dense attention over the row is still cheap next to the matmuls of a
135M-parameter model; past it, the padded layout costs less (bench/RESULTS.md, DPO pair layouts)."""

_PROMPT = 0


def _config(model: nn.Module) -> object | None:
    """The model's config, through DDP-style wrappers (`.module`); peft forwards `.config` itself."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "config", None)


def attention_implementation(model: nn.Module) -> str:
    """The model's attention implementation name (`sdpa`, `eager`, `flash_attention_2`, …), '' if unknown."""
    return str(getattr(_config(model), "_attn_implementation", "") or "")


def packable_config(config: object | None) -> bool:
    """Whether a model with this config computes a packed row exactly (module docstring: When it applies)."""
    if config is None or getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    if str(getattr(config, "_attn_implementation", "") or "") not in PACKABLE_ATTENTION:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return False
    if getattr(config, "attention_chunk_size", None) is not None:
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or all(kind == "full_attention" for kind in layer_types)


def packable(model: nn.Module) -> bool:
    """`packable_config` of the model's config, through DDP and peft wrappers."""
    return packable_config(_config(model))


def pack_fits(prompts: Sequence[Sequence[int]], total_tokens: int, model_packable: bool) -> bool:
    """Whether a micro-batch should be packed: the model computes packed rows exactly (`packable`), the row has at
    most `MAX_PACKED_TOKENS` tokens, and no prompt is empty (a response's first token needs a position to be
    predicted from)."""
    return model_packable and total_tokens <= MAX_PACKED_TOKENS and all(len(p) > 0 for p in prompts)


def pack_groups(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]]
) -> dict[str, torch.Tensor]:
    """Pack `prompts[b]` with its responses `responses[b][j]` (any number per prompt) into one row.

    Returns CPU tensors:
    - `input_ids`, `position_ids` `[1, N]`;
    - `group` `[N]` (which prompt a token belongs to) and `part` `[N]` (0 prompt, else the response's index + 1):
      the mask's inputs (`packed_attention_mask`);
    - `keep` `[K]`: the positions whose logits are needed, ascending, each once (a prompt's last position
      predicts the first token of all its responses);
    - `labels`, `label_rows` and `label_response` `[M]`, one entry per response token: the token, the row of the
      kept logits that predicts it, and its response's index in prompt-major order (responses numbered 0, 1, …
      across all prompts in turn);
    - `last` `[R]`: the position of each response's last token (a reward model's score is read there).
    """
    if len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} response lists for {len(prompts)} prompts")
    ids: list[int] = []
    positions: list[int] = []
    group: list[int] = []
    part: list[int] = []
    predictors: list[int] = []  # sequence position predicting each response token
    labels: list[int] = []
    label_response: list[int] = []
    last: list[int] = []
    for b, (prompt, answers) in enumerate(zip(prompts, responses, strict=True)):
        if not prompt:
            raise ValueError(f"prompt {b} is empty: a response needs a prompt token to be predicted from")
        last_prompt = len(ids) + len(prompt) - 1
        ids.extend(prompt)
        positions.extend(range(len(prompt)))
        group.extend([b] * len(prompt))
        part.extend([_PROMPT] * len(prompt))
        for answer in answers:
            if not answer:
                raise ValueError(f"an empty response to prompt {b}: every response needs at least one token")
            start = len(ids)
            ids.extend(answer)
            positions.extend(range(len(prompt), len(prompt) + len(answer)))
            group.extend([b] * len(answer))
            part.extend([len(last) + 1] * len(answer))  # a part id unique to this response
            # token 0 is predicted by the prompt's last position, token t by response token t - 1
            predictors.append(last_prompt)
            predictors.extend(range(start, start + len(answer) - 1))
            labels.extend(answer)
            label_response.extend([len(last)] * len(answer))
            last.append(len(ids) - 1)
    keep = sorted(set(predictors))
    row_of = {p: i for i, p in enumerate(keep)}
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "group": torch.tensor(group, dtype=torch.long),
        "part": torch.tensor(part, dtype=torch.long),
        "keep": torch.tensor(keep, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "label_rows": torch.tensor([row_of[p] for p in predictors], dtype=torch.long),
        "label_response": torch.tensor(label_response, dtype=torch.long),
        "last": torch.tensor(last, dtype=torch.long),
    }


def packed_attention_mask(group: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """`[1, 1, N, N]` boolean mask of a packed row (sdpa's convention): True where query i may attend key k."""
    index = torch.arange(group.shape[0], device=group.device)
    causal = index[None, :] <= index[:, None]  # [N (query), N (key)]
    same_group = group[:, None] == group[None, :]
    visible_part = (part[None, :] == _PROMPT) | (part[None, :] == part[:, None])
    return (causal & same_group & visible_part)[None, None]


def packed_forward(model: nn.Module, packed: dict[str, torch.Tensor], **kwargs: object) -> object:
    """The model's forward over a `pack_groups` row with its block mask, no KV cache. Refuses a model that
    `packable` does not vouch for: the wrong mask convention would silently mean no masking at all."""
    if not packable(model):
        raise ValueError(
            f"packed rows need an sdpa model with full attention in every layer ({sorted(PACKABLE_MODEL_TYPES)}), "
            f"got {getattr(_config(model), 'model_type', None)!r} with {attention_implementation(model)!r}"
        )
    return model(
        input_ids=packed["input_ids"],
        attention_mask=packed_attention_mask(packed["group"], packed["part"]),
        position_ids=packed["position_ids"],
        use_cache=False,
        **kwargs,
    )


def packed_logprobs(model: nn.Module, packed: dict[str, torch.Tensor], n_responses: int) -> torch.Tensor:
    """`log π(y | x) = Σ_t log π(a_t | s_t)` `[n_responses]` float32 for a `pack_groups` row (prompt-major order),
    in one forward pass with logits only at the `keep` positions."""
    out = packed_forward(model, packed, logits_to_keep=packed["keep"])
    logits = out[0] if isinstance(out, tuple) else out.logits  # [1, K, V]
    logits = logits[0].float()[packed["label_rows"]]  # [M, V]: the row predicting each response token
    token_logprobs = -F.cross_entropy(logits, packed["labels"], reduction="none")  # [M]
    sums = torch.zeros(n_responses, dtype=torch.float32, device=token_logprobs.device)
    return sums.index_add(0, packed["label_response"], token_logprobs)
