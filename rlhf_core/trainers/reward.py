"""Reward model: the SFT model with its vocabulary head replaced by a scalar head, trained on comparisons with
the Bradley–Terry loss

    loss = mean_pairs −log σ(r(x, y_w) − r(x, y_l) − m)

(m: an optional per-pair `margin` column, 0 when absent); r is the score head on the last real token
(`rlhf_core.models.score_sequences` semantics).

Rows are preferences `{"prompt", "chosen", "rejected"[, "margin"]}` or rankings `{"prompt", "responses":
[best, ..., worst]}`. Every response of a micro-batch goes through the model in ONE forward pass (chosen and
rejected together; packed into one unpadded row with each prompt computed once, `rlhf_core.packing`, when the
model computes packed rows exactly and the row fits); a ranking of K responses is scored with K sequences and
yields all K(K−1)/2 pairs from those K scores (InstructGPT: the pairs of one prompt stay in one batch, so no
response is seen twice per epoch, which is what overfits). The loss is a mean over the pairs of the whole
global batch; `batch_size` counts rows.

Normalisation (`normalize_rewards=True`): after training, the mean score μ over every response of the
*training* rows (chosen and rejected, or all ranked responses) is subtracted through the score head's bias, so
those responses score 0 on average. The Llama-style head has no bias, so a `Linear(hidden, 1, bias=True)`
replaces it (same weight, bias −μ) and `config.reward_offset` records μ. Loading honours that bias only where
the loader rebuilds a biased head (HF's `LlamaForSequenceClassification` has a bias-free `score` and drops
`score.bias`); `rlhf_core.models.load_reward_model` is the loader that must do so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.callbacks import MetricLogger
from rlhf_core.lengths import Auto, resolve_from_rows
from rlhf_core.losses import bradley_terry_loss
from rlhf_core.models import disable_dropout, last_token_index, reward_model_from_causal_lm, unwrap_peft
from rlhf_core.packing import pack_fits, pack_groups, packable, packed_forward
from rlhf_core.tokenization import EncodedPair, collate_right_padded, encode_prompt_response, padding_id
from rlhf_core.trainers.common import (
    Stage,
    TrainerConfig,
    TrainResult,
    all_reduce_sum,
    apply_lora,
    check_length_limits,
    fit,
    is_peft_model,
    make_accelerator,
    save_final_model,
    set_seed,
    start_session,
)


@dataclass(frozen=True)
class RewardConfig(TrainerConfig):
    """Reward-model hyper-parameters (plus the shared `TrainerConfig` fields)."""

    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    max_prompt_len: int | Auto | None = "auto"
    """Keep the last this-many prompt tokens (None: no limit;
    "auto": cover 95% of the prompts, `rlhf_core.lengths`)."""
    max_response_len: int | Auto | None = "auto"
    """Keep the first this-many tokens of each response (None: no limit; "auto": cover 95% of the responses)."""
    normalize_rewards: bool = False
    """Shift the head's bias so the training rows' responses score mean 0 (see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_length_limits(self, "max_prompt_len", "max_response_len")


@dataclass(frozen=True)
class Comparison:
    """One row as responses to score and the pairs among them.

    `pairs[k] = (w, l, margin)`: response w is preferred to response l (indices into `responses`).
    """

    responses: tuple[EncodedPair, ...]
    pairs: tuple[tuple[int, int, float], ...]


def encode_comparisons(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], config: RewardConfig
) -> list[Comparison]:
    """Preference or ranking rows → `Comparison`s (a ranking `[best, ..., worst]` gives all i < j pairs)."""
    config = resolve_from_rows(config, tokenizer, rows)  # "auto" limits: from these rows
    out = []
    for row in rows:
        if "responses" in row:
            texts = list(row["responses"])
            if len(texts) < 2:
                raise ValueError(f"a ranking needs at least 2 responses, got {len(texts)}")
            pairs = tuple((w, lo, 0.0) for w, lo in combinations(range(len(texts)), 2))
        else:
            texts = [row["chosen"], row["rejected"]]
            margin = row.get("margin")
            pairs = ((0, 1, 0.0 if margin is None else float(margin)),)
        responses = tuple(
            encode_prompt_response(tokenizer, row["prompt"], text, config.max_prompt_len, config.max_response_len)
            for text in texts
        )
        out.append(Comparison(responses, pairs))
    return out


def collate_comparisons(
    comparisons: Sequence[Comparison], pad_id: int, device: torch.device, pack: bool = False
) -> dict[str, torch.Tensor]:
    """All R responses of the rows, plus `chosen_index`, `rejected_index` and `margin` `[num_pairs]` pointing
    into them. Packed into one unpadded row, each prompt once for all its responses (`packing.pack_groups`), when
    `pack` (the model is `packing.packable`) and the row fits (`packing.pack_fits`); else one
    right-padded batch `[R, L]`."""
    responses, chosen, rejected, margins = [], [], [], []
    for comparison in comparisons:
        offset = len(responses)
        responses.extend(comparison.responses)
        for w, lo, m in comparison.pairs:
            chosen.append(offset + w)
            rejected.append(offset + lo)
            margins.append(m)
    prompts = [c.responses[0].prompt_ids for c in comparisons]
    if pack_fits(prompts, sum(_comparison_tokens(c) for c in comparisons), pack) and all(
        len({tuple(r.prompt_ids) for r in c.responses}) == 1 for c in comparisons
    ):
        batch = pack_groups(prompts, [[r.response_ids for r in c.responses] for c in comparisons])
    else:
        batch = collate_right_padded(responses, pad_id)
    batch["chosen_index"] = torch.tensor(chosen, dtype=torch.long)
    batch["rejected_index"] = torch.tensor(rejected, dtype=torch.long)
    batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    return {k: v.to(device) for k, v in batch.items()}


def _comparison_tokens(comparison: Comparison) -> int:
    return len(comparison.responses[0].prompt_ids) + sum(len(r.response_ids) for r in comparison.responses)


def score_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores `[R]` float32: the score head on the last real token's final hidden state.

    Same math as `rlhf_core.models.score_sequences`, but the body runs through `model` as given — the
    DDP-wrapped module while training, so gradients are synchronised — and the head is taken from inside it.
    """
    head = _inner(model).score
    if "last" in batch:  # packed (packing.pack_groups): one row, the score read at each response's last token
        out = packed_forward(model, batch, output_hidden_states=True)
        return head(out.hidden_states[-1][0, batch["last"]]).squeeze(-1).float()
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = out.hidden_states[-1]  # [R, L, hidden]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last_hidden = hidden[rows, last_token_index(batch["attention_mask"])]  # [R, hidden]
    return head(last_hidden).squeeze(-1).float()


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate.utils import extract_model_from_parallel

    return unwrap_peft(extract_model_from_parallel(model))


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    scores = score_batch(model, batch)
    chosen, rejected = scores[batch["chosen_index"]], scores[batch["rejected_index"]]
    mean_loss, accuracy = bradley_terry_loss(chosen, rejected, batch["margin"])
    n = float(chosen.shape[0])
    detached = scores.detach()
    sums = {
        "loss": float(mean_loss.detach()) * n,
        "accuracy": float(accuracy) * n,
        "margin": float((chosen - rejected).detach().sum()),
        "count": n,
        "responses": float(detached.shape[0]),
        "reward_sum": float(detached.sum()),
        "reward_sq_sum": float((detached**2).sum()),
        # tokens the model processes: a packed batch holds each prompt once, a padded one once per response
        "tokens": float(batch["input_ids"].numel() if "last" in batch else batch["attention_mask"].sum()),
    }
    return mean_loss * n, sums


def _summarize(sums: dict[str, float]) -> dict[str, float]:
    n, r = max(sums["count"], 1.0), max(sums["responses"], 1.0)
    mean = sums["reward_sum"] / r
    return {
        "loss": sums["loss"] / n,
        "accuracy": sums["accuracy"] / n,
        "reward_margin": sums["margin"] / n,
        "reward_mean": mean,
        "reward_std": math.sqrt(max(sums["reward_sq_sum"] / r - mean**2, 0.0)),
    }


def reward_stage(pad_id: int, device: torch.device, pack: bool = False) -> Stage:
    """The reward-model plug-in of `common.fit`: rows are `Comparison`s; `pack`: the model computes packed rows
    exactly (`packing.packable`)."""
    return Stage(
        name="rm",
        collate=lambda rows: collate_comparisons(rows, pad_id, device, pack),
        count=lambda batch: float(batch["chosen_index"].shape[0]),
        loss=_loss,
        summarize=_summarize,
        key_metric="accuracy",
    )


# ------------------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------------------


def mean_score(
    accelerator: Accelerator,
    model: torch.nn.Module,
    comparisons: Sequence[Comparison],
    pad_id: int,
    batch_size: int,
) -> float:
    """Mean score over every response of `comparisons` (sharded over processes, reduced)."""
    shard = list(comparisons)[accelerator.process_index :: accelerator.num_processes]
    total, count = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(shard), batch_size):
            scores = score_batch(
                model,
                collate_comparisons(shard[start : start + batch_size], pad_id, accelerator.device, packable(model)),
            )
            total, count = total + float(scores.sum()), count + scores.shape[0]
    sums = all_reduce_sum(accelerator, {"total": total, "count": count})
    return sums["total"] / max(sums["count"], 1.0)


def set_score_offset(model: torch.nn.Module, offset: float) -> None:
    """Make the head compute `w·h + b − offset`: a biased `Linear` replaces a bias-free one; the offset is
    also recorded as `config.reward_offset`."""
    head = model.score
    biased = torch.nn.Linear(
        head.in_features, head.out_features, bias=True, dtype=head.weight.dtype, device=head.weight.device
    )
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        previous = head.bias if head.bias is not None else torch.zeros_like(biased.bias)
        biased.bias.copy_(previous - offset)
    model.score = biased
    model.config.reward_offset = float(offset)


def train_reward_model(
    config: RewardConfig,
    sft_model_path: str | Path,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    output_dir: str | Path,
    logger: MetricLogger | None = None,
) -> TrainResult:
    """Train a reward model initialised from the SFT model at `sft_model_path` on preference or ranking rows;
    resumes from the newest checkpoint in `output_dir`. Saves an `AutoModelForSequenceClassification`
    (`num_labels=1`, `pad_token_id` set) to `output_dir/model`.

    Metrics (`rm/` and `rm/eval_`): loss, accuracy, reward_margin, reward_mean, reward_std; plus grad_norm,
    learning_rate, tokens_per_sec, peak_memory_mb; `rm/reward_offset` when normalising.
    """
    set_seed(config.seed)
    accelerator = make_accelerator(config)
    tokenizer = AutoTokenizer.from_pretrained(sft_model_path)
    config = resolve_from_rows(config, tokenizer, train_rows)
    pad_id = padding_id(tokenizer)
    model = disable_dropout(reward_model_from_causal_lm(sft_model_path, dtype=torch.float32, seed=config.seed))
    if config.lora is not None:
        # SEQ_CLS makes peft train the new score head in full beside the adapters.
        model = apply_lora(model, config.lora, task_type="SEQ_CLS")
    session = start_session(config, accelerator, model, output_dir, logger)
    train = encode_comparisons(tokenizer, train_rows, config)
    metrics = fit(
        session,
        reward_stage(pad_id, accelerator.device, packable(model)),
        train,
        encode_comparisons(tokenizer, eval_rows, config),
    )

    final = session.unwrapped
    if is_peft_model(final):
        final = final.merge_and_unload()
    if config.normalize_rewards:
        offset = mean_score(accelerator, final, train, pad_id, config.eval_batch_size or config.batch_size)
        set_score_offset(final, offset)
        metrics["rm/reward_offset"] = offset
        session.log({"rm/reward_offset": offset})
    model_dir = save_final_model(accelerator, final, tokenizer, output_dir)
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from_step=session.resumed_from_step)
