"""Supervised fine-tuning on demonstrations: prompt-masked next-token loss.

    loss = − Σ_rows Σ_t m_t · log π(x_t | x_<t)  /  Σ_rows Σ_t m_t

with m = `response_mask` (1 on response tokens including the closing end-of-turn/EOS token, 0 on the prompt
and padding), summed over the whole global batch of an optimizer step (a token-level mean: long responses
weigh more). Prompts and responses go through `rlhf_core.tokenization` (chat template, separate tokenisation,
EOS).

Packing (`packing=True`): the micro-batch's samples are laid end to end into rows of at most `pack_length`
tokens. Each sample keeps its own position ids (restarting at 0) and a 4-D block-diagonal causal attention
mask stops a token from seeing any other sample of its row, so a packed batch computes the same per-sample
loss as an unpacked one (up to float rounding) with less padding. The mask is an additive float mask, which
eager and SDPA attention both accept; flash-attention kernels need their own varlen path and are not used with
packing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.callbacks import MetricLogger
from rlhf_core.lengths import Auto, resolve_from_rows
from rlhf_core.losses import sft_loss
from rlhf_core.models import disable_dropout
from rlhf_core.tokenization import EncodedPair, collate_right_padded, encode_prompt_response, padding_id
from rlhf_core.trainers.common import (
    Stage,
    TrainerConfig,
    TrainResult,
    apply_lora,
    check_length_limits,
    fit,
    make_accelerator,
    save_final_model,
    set_seed,
    start_session,
)


@dataclass(frozen=True)
class SFTConfig(TrainerConfig):
    """SFT hyper-parameters (plus the shared `TrainerConfig` fields)."""

    learning_rate: float = 5e-5
    """Peak learning rate of AdamW."""
    max_prompt_len: int | Auto | None = "auto"
    """Keep the last this-many prompt tokens (None: no limit;
    "auto": cover 95% of the prompts, `rlhf_core.lengths`)."""
    max_response_len: int | Auto | None = "auto"
    """Keep the first this-many response tokens (None: no limit; "auto": cover 95%
    of the responses); a cut response has no EOS target."""
    packing: bool = False
    """Pack each micro-batch's samples into rows of `pack_length` tokens, attention isolated per sample."""
    pack_length: int = 1024
    """Capacity of a packed row in tokens; a longer sample gets a row of its own."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_length_limits(self, "max_prompt_len", "max_response_len")
        if self.pack_length <= 1:
            raise ValueError(f"pack_length must be > 1, got {self.pack_length}")


# ------------------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------------------


def encode_demonstrations(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], config: SFTConfig
) -> list[EncodedPair]:
    """Each `{"prompt", "response"}` row as separately tokenised prompt and response ids."""
    config = resolve_from_rows(config, tokenizer, rows)  # "auto" limits: from these rows
    return [
        encode_prompt_response(
            tokenizer, row["prompt"], row["response"], config.max_prompt_len, config.max_response_len
        )
        for row in rows
    ]


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sample indices into bins of total length ≤ capacity, in order (first fit). A sample longer than
    the capacity gets a bin of its own."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i, length in enumerate(lengths):
        slot = next((b for b, load in enumerate(loads) if load + length <= capacity), None)
        if slot is None:
            bins.append([i])
            loads.append(length)
        else:
            bins[slot].append(i)
            loads[slot] += length
    return bins


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask `[batch, 1, L, L]`: query i may attend key j iff j ≤ i and both belong to the
    same segment (0 where allowed, the dtype's minimum elsewhere). `segment_ids` `[batch, L]`; trailing
    padding is a segment of its own, so no query row is fully masked (which would make softmax nan)."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, L, L]
    allowed = (same & causal).unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def collate_packed(pairs: Sequence[EncodedPair], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Pack samples into rows: `input_ids`, `response_mask`, `position_ids`, `segment_ids`, all `[rows, L]`.

    `response_mask` is zero on each sample's first token (nothing inside its segment predicts it), so no loss
    term crosses a sample boundary. `segment_ids`: 1, 2, ... per sample, 0 on padding.
    """
    bins = _first_fit([len(p.prompt_ids) + len(p.response_ids) for p in pairs], capacity)
    width = max(sum(len(pairs[i].prompt_ids) + len(pairs[i].response_ids) for i in b) for b in bins)
    shape = (len(bins), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    response_mask, position_ids, segment_ids = (torch.zeros(shape, dtype=torch.long) for _ in range(3))
    for row, members in enumerate(bins):
        start = 0
        for segment, i in enumerate(members, start=1):
            ids = pairs[i].prompt_ids + pairs[i].response_ids
            end = start + len(ids)
            input_ids[row, start:end] = torch.tensor(ids)
            response_mask[row, start + len(pairs[i].prompt_ids) : end] = 1
            response_mask[row, start] = 0
            position_ids[row, start:end] = torch.arange(len(ids))
            segment_ids[row, start:end] = segment
            start = end
    return {
        "input_ids": input_ids,
        "response_mask": response_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
    }


# ------------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------------


def first_response_column(response_mask: torch.Tensor) -> int:
    """The smallest column holding a response token in any row of `response_mask` `[B, L]` (0 if none)."""
    has_response = response_mask.bool().any(dim=1)
    if not bool(has_response.any()):
        return 0
    return int(response_mask.int().argmax(dim=1)[has_response].min())


def sft_forward_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Summed next-token NLL over response tokens (with grad) and detached sums for the metrics.

    `batch`: right-padded (`attention_mask` `[B, L]`) or packed (`segment_ids` `[B, L]`, turned into a 4-D
    block-causal mask here, in the model's dtype).
    """
    input_ids, response_mask = batch["input_ids"], batch["response_mask"]
    keep = 0  # all positions: a packed row has responses all along it
    if "segment_ids" in batch:
        dtype = next(model.parameters()).dtype
        attention_mask = block_causal_mask(batch["segment_ids"], dtype)
        tokens = int((batch["segment_ids"] > 0).sum())
    else:
        attention_mask = batch["attention_mask"]
        tokens = int(attention_mask.sum())
        # Right-padded rows: only positions from just before the earliest response token predict a trained token;
        # projecting the prompt onto the vocabulary too would be ~20% of a small model's FLOPs (bench/RESULTS.md).
        keep = input_ids.shape[1] - max(first_response_column(response_mask) - 1, 0)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=batch["position_ids"], logits_to_keep=keep
    )
    width = out.logits.shape[1]  # the logits cover the last `width` input positions
    loss_sum = sft_loss(out.logits, input_ids[:, -width:], response_mask[:, -width:], reduction="sum")
    count = float(batch["response_mask"][:, 1:].sum())
    return loss_sum, {"loss": float(loss_sum.detach()), "count": count, "tokens": tokens}


def _summarize(sums: dict[str, float]) -> dict[str, float]:
    loss = sums["loss"] / max(sums["count"], 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def sft_stage(tokenizer: PreTrainedTokenizerBase, config: SFTConfig, device: torch.device) -> Stage:
    """The SFT plug-in of `common.fit`: rows are `EncodedPair`s (see `encode_demonstrations`)."""
    pad_id = padding_id(tokenizer)

    def collate(pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        if config.packing:
            batch = collate_packed(pairs, pad_id, config.pack_length)
        else:
            batch = collate_right_padded(pairs, pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    return Stage(
        name="sft",
        collate=collate,
        count=lambda batch: float(batch["response_mask"][:, 1:].sum()),
        loss=sft_forward_sums,
        summarize=_summarize,
    )


def train_sft(
    config: SFTConfig,
    model_path: str | Path,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    output_dir: str | Path,
    logger: MetricLogger | None = None,
) -> TrainResult:
    """Fine-tune the causal LM at `model_path` on `{"prompt", "response"}` rows; resumes from the newest
    checkpoint in `output_dir`. Returns the final model in `output_dir/model`.

    Metrics: `sft/loss`, `sft/perplexity`, `sft/grad_norm`, `sft/learning_rate`, `sft/tokens_per_sec`,
    `sft/peak_memory_mb`, `sft/eval_loss`, `sft/eval_perplexity`.
    """
    set_seed(config.seed)
    accelerator = make_accelerator(config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = resolve_from_rows(config, tokenizer, train_rows)
    model = disable_dropout(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True))
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    session = start_session(config, accelerator, model, output_dir, logger)
    stage = sft_stage(tokenizer, config, accelerator.device)
    metrics = fit(
        session,
        stage,
        encode_demonstrations(tokenizer, train_rows, config),
        encode_demonstrations(tokenizer, eval_rows, config),
    )
    model_dir = save_final_model(accelerator, session.model, tokenizer, output_dir)
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from_step=session.resumed_from_step)
