"""Direct preference optimisation: the policy starts from the SFT model and learns from preference pairs
against a frozen reference (the SFT model), with no reward model and no sampling.

    loss = mean_pairs ℓ(h),   h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]

with ℓ from `rlhf_core.losses.dpo_loss` (sigmoid / ipo / hinge, optional label smoothing); log π(y|x) is the
sum of the response tokens' log-probs (`rlhf_core.logprobs.sequence_logprobs`).

1. Reference log-probs are computed once, before training, in one pass over the train and eval pairs, and
   cached in `output_dir/reference_logprobs.safetensors` (atomically written, the fingerprint in its header).
   A resumed run loads the cache instead of recomputing, when its fingerprint (model path, tokenised pairs) matches; else it recomputes (the numbers
   are deterministic either way). With LoRA the reference is the policy with adapters disabled; without LoRA a
   frozen copy of the SFT model is loaded for that pass and freed before training.
2. Each step, the prompt of every pair goes through the policy once for both responses (`share_prompt`): its
   FLOPs and activations are paid once per pair, not twice. The micro-batch is packed into one row with no
   padding and a block attention mask (`rlhf_core.packing`) when the model computes packed rows exactly and the
   row is short enough (`packing.pack_fits`); otherwise both responses attend to the prompt's KV cache in a
   padded batch (`logprobs.shared_prompt_logprobs`). With `share_prompt: false`, chosen and rejected go through
   as two whole sequences in one forward pass (`[2B, L]`, chosen rows first). The same numbers every way, to
   float rounding.

Implicit rewards r = β·(log π − log π_ref) are the metrics' "rewards": `dpo/chosen_rewards`,
`dpo/rejected_rewards`, `dpo/reward_margin` = mean(r_w − r_l), `dpo/reward_accuracy` = mean(r_w > r_l).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import save
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.atomic import atomic_write_bytes
from rlhf_core.callbacks import MetricLogger
from rlhf_core.lengths import Auto, resolve_from_rows
from rlhf_core.logprobs import sequence_logprobs, shared_prompt_logprobs
from rlhf_core.losses import DPOLossType, dpo_loss
from rlhf_core.models import disable_dropout
from rlhf_core.packing import pack_fits, pack_groups, packable, packed_logprobs
from rlhf_core.tokenization import EncodedPair, collate_right_padded, encode_prompt_response, padding_id
from rlhf_core.trainers.common import (
    Stage,
    TrainerConfig,
    TrainResult,
    apply_lora,
    check_length_limits,
    fit,
    freeze,
    make_accelerator,
    reference_model,
    save_final_model,
    set_seed,
    start_session,
)

REFERENCE_CACHE = "reference_logprobs.safetensors"


@dataclass(frozen=True)
class DPOConfig(TrainerConfig):
    """DPO hyper-parameters (plus the shared `TrainerConfig` fields)."""

    learning_rate: float = 5e-6
    """Peak learning rate of AdamW (DPO wants a small one)."""
    dpo_beta: float = 0.1
    """β: strength of the implicit KL constraint to the reference (higher: stay closer)."""
    loss_type: DPOLossType = "sigmoid"
    """"sigmoid" (DPO), "ipo" or "hinge" (SLiC); see `rlhf_core.losses.dpo_loss`."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability ε ∈ [0, 0.5] that a label is flipped (sigmoid only)."""
    share_prompt: bool = True
    """Compute each pair's prompt once for both responses (a packed row, or its KV cache reused; the same log-probs
    to float rounding, `rlhf_core.packing`). False: chosen and rejected as two whole sequences, the prompt twice."""
    max_prompt_len: int | Auto | None = "auto"
    """Keep the last this-many prompt tokens (None: no limit;
    "auto": cover 95% of the prompts, `rlhf_core.lengths`)."""
    max_response_len: int | Auto | None = "auto"
    """Keep the first this-many tokens of each response (None: no limit; "auto": cover 95% of the responses)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dpo_beta > 0:
            raise ValueError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):
            raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'hinge', got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
        check_length_limits(self, "max_prompt_len", "max_response_len")


@dataclass(frozen=True)
class PreferencePair:
    """One tokenised preference row and its reference log-probs (0.0 until computed)."""

    chosen: EncodedPair
    rejected: EncodedPair
    ref_chosen_logps: float = 0.0
    ref_rejected_logps: float = 0.0


def encode_preferences(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict], config: DPOConfig
) -> list[PreferencePair]:
    """`{"prompt", "chosen", "rejected"}` rows → tokenised pairs (the prompt encoded identically twice)."""

    config = resolve_from_rows(config, tokenizer, rows)  # "auto" limits: from these rows

    def encode(row: dict, response: object) -> EncodedPair:
        return encode_prompt_response(
            tokenizer, row["prompt"], response, config.max_prompt_len, config.max_response_len
        )

    return [PreferencePair(encode(row, row["chosen"]), encode(row, row["rejected"])) for row in rows]


def collate_pairs(
    pairs: Sequence[PreferencePair],
    pad_id: int,
    device: torch.device,
    share_prompt: bool = True,
    pack: bool = False,
) -> dict[str, torch.Tensor]:
    """A micro-batch of `B` pairs, plus `ref_chosen_logps` and `ref_rejected_logps` `[B]`.

    `share_prompt` (the default): the prompt once per pair. Packed into one row (`packing.pack_groups`: chosen
    and rejected of pair `b` are responses `2b` and `2b + 1`) when `pack` (the model is `packing.packable`) and
    the row fits (`packing.pack_fits`); else `prompt_ids`/`prompt_mask` `[B, P]` left-padded and
    both responses `response_ids`/`response_mask` `[2B, R]` right-padded, in rows `2b` and `2b + 1`
    (`logprobs.shared_prompt_logprobs`). Otherwise chosen then rejected as whole sequences in one right-padded
    batch `[2B, L]` (`input_ids`, `attention_mask`, `response_mask`).
    """
    prompts = [p.chosen.prompt_ids for p in pairs]
    if share_prompt and pack_fits(prompts, sum(_pair_tokens(p) for p in pairs), pack):
        _check_shared_prompts(pairs)
        batch = pack_groups(prompts, [[p.chosen.response_ids, p.rejected.response_ids] for p in pairs])
    elif share_prompt:
        batch = _collate_shared_prompt(pairs, pad_id)
    else:
        batch = collate_right_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["ref_chosen_logps"] = torch.tensor([p.ref_chosen_logps for p in pairs], dtype=torch.float32)
    batch["ref_rejected_logps"] = torch.tensor([p.ref_rejected_logps for p in pairs], dtype=torch.float32)
    return {k: v.to(device) for k, v in batch.items()}


def _pair_tokens(pair: PreferencePair) -> int:
    return len(pair.chosen.prompt_ids) + len(pair.chosen.response_ids) + len(pair.rejected.response_ids)


def _check_shared_prompts(pairs: Sequence[PreferencePair]) -> None:
    if any(p.chosen.prompt_ids != p.rejected.prompt_ids for p in pairs):
        raise ValueError("a pair's chosen and rejected responses were encoded with different prompts")


def _collate_shared_prompt(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    _check_shared_prompts(pairs)
    width = max(len(p.chosen.prompt_ids) for p in pairs)
    responses = [r for p in pairs for r in (p.chosen.response_ids, p.rejected.response_ids)]
    length = max(len(r) for r in responses)
    prompt_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, pair in enumerate(pairs):
        ids = pair.chosen.prompt_ids
        prompt_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[i, width - len(ids) :] = 1
    response_ids = torch.full((len(responses), length), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), length), dtype=torch.long)
    for i, ids in enumerate(responses):
        response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[i, : len(ids)] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "response_ids": response_ids,
        "response_mask": response_mask,
    }


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(chosen_logps, rejected_logps)`, each `[B]`: sequence log-probs of a `collate_pairs` batch, with the
    prompt computed once per pair when the batch shares it, else from one forward over `[2B, L]`."""
    if "keep" in batch:  # packed (packing.pack_groups)
        logps = packed_logprobs(model, batch, 2 * batch["ref_chosen_logps"].shape[0]).view(-1, 2)
        return logps[:, 0], logps[:, 1]
    if "prompt_ids" in batch:
        logps = shared_prompt_logprobs(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"]
        )  # [B, 2]
        return logps[:, 0], logps[:, 1]
    logps = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def batch_tokens(batch: dict[str, torch.Tensor]) -> float:
    """Tokens the model processes for the batch (a shared prompt counts once)."""
    if "keep" in batch:
        return float(batch["input_ids"].numel())
    if "prompt_ids" in batch:
        return float(batch["prompt_mask"].sum() + batch["response_mask"].sum())
    return float(batch["attention_mask"].sum())


# ------------------------------------------------------------------------------------------------------------
# Reference log-probs: one pass before training, cached
# ------------------------------------------------------------------------------------------------------------


def _fingerprint(model_path: str | Path, pairs: Sequence[PreferencePair]) -> str:
    """sha256 of the reference model's path and every token id of the pairs: a cache key for the pass."""
    digest = hashlib.sha256(str(Path(model_path).resolve()).encode())
    for p in pairs:
        ids = (p.chosen.prompt_ids, p.chosen.response_ids, p.rejected.prompt_ids, p.rejected.response_ids)
        digest.update(json.dumps(ids).encode())
    return digest.hexdigest()


def compute_reference_logps(
    accelerator: Accelerator,
    ref: torch.nn.Module,
    pairs: Sequence[PreferencePair],
    pad_id: int,
    batch_size: int,
    share_prompt: bool = True,
) -> torch.Tensor:
    """`[N, 2]` float32 (chosen, rejected) sequence log-probs of all `pairs` under `ref` (already in eval mode
    and under no_grad). Pairs are sharded over processes and gathered, so every process gets all N rows."""
    mine = list(range(accelerator.process_index, len(pairs), accelerator.num_processes))
    found: list[tuple[int, float, float]] = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        chosen, rejected = pair_logps(
            ref,
            collate_pairs([pairs[i] for i in chunk], pad_id, accelerator.device, share_prompt, packable(ref)),
        )
        found.extend(zip(chunk, chosen.tolist(), rejected.tolist(), strict=True))
    if accelerator.num_processes > 1:
        found = gather_object(found)
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    for i, c, r in found:
        out[i, 0], out[i, 1] = c, r
    return out


def _load_cache(path: Path, fingerprint: str) -> torch.Tensor | None:
    """The cached log-probs if `path` holds them for `fingerprint` (the fingerprint is in the header)."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as cache:
        if (cache.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return cache.get_tensor("logps")


def reference_logps(
    accelerator: Accelerator,
    policy: torch.nn.Module,
    model_path: str | Path,
    pairs: Sequence[PreferencePair],
    pad_id: int,
    config: DPOConfig,
    output_dir: Path,
) -> torch.Tensor:
    """Cached `[N, 2]` reference log-probs of `pairs` (see the module docstring, step 1)."""
    cache_path = output_dir / REFERENCE_CACHE
    fingerprint = _fingerprint(model_path, pairs)
    cached = _load_cache(cache_path, fingerprint)
    if cached is not None:
        return cached
    frozen = None
    if config.lora is None:
        frozen = freeze(
            disable_dropout(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True))
        )
        frozen.to(accelerator.device)
    with reference_model(policy, frozen) as ref:
        logps = compute_reference_logps(
            accelerator, ref, pairs, pad_id, config.eval_batch_size or config.batch_size, config.share_prompt
        )
    del frozen
    if accelerator.is_main_process:
        atomic_write_bytes(cache_path, save({"logps": logps}, metadata={"fingerprint": fingerprint}))
    accelerator.wait_for_everyone()
    return logps


# ------------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------------


def dpo_stage(config: DPOConfig, pad_id: int, device: torch.device, pack: bool = False) -> Stage:
    """The DPO plug-in of `common.fit`: rows are `PreferencePair`s with their reference log-probs; `pack`: the
    policy computes packed rows exactly (`packing.packable`)."""

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        chosen, rejected = pair_logps(model, batch)
        mean_loss, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            batch["ref_chosen_logps"],
            batch["ref_rejected_logps"],
            config.dpo_beta,
            config.loss_type,
            config.label_smoothing,
        )
        n = chosen.shape[0]
        sums = {
            "loss": float(mean_loss.detach()) * n,
            "count": float(n),
            "tokens": batch_tokens(batch),
            "chosen_rewards": float(chosen_rewards.sum()),
            "rejected_rewards": float(rejected_rewards.sum()),
            "reward_accuracy": float((chosen_rewards > rejected_rewards).sum()),
            "chosen_logps": float(chosen.detach().sum()),
            "rejected_logps": float(rejected.detach().sum()),
        }
        return mean_loss * n, sums

    def summarize(sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        metrics = {
            k: sums[k] / n
            for k in (
                "loss",
                "chosen_rewards",
                "rejected_rewards",
                "reward_accuracy",
                "chosen_logps",
                "rejected_logps",
            )
        }
        metrics["reward_margin"] = metrics["chosen_rewards"] - metrics["rejected_rewards"]
        return metrics

    return Stage(
        name="dpo",
        collate=lambda pairs: collate_pairs(pairs, pad_id, device, config.share_prompt, pack),
        count=lambda batch: float(batch["ref_chosen_logps"].shape[0]),
        loss=loss,
        summarize=summarize,
    )


def _with_reference(pairs: list[PreferencePair], logps: torch.Tensor) -> list[PreferencePair]:
    return [
        PreferencePair(p.chosen, p.rejected, float(c), float(r))
        for p, (c, r) in zip(pairs, logps.tolist(), strict=True)
    ]


def train_dpo(
    config: DPOConfig,
    sft_model_path: str | Path,
    train_rows: Sequence[dict],
    eval_rows: Sequence[dict],
    output_dir: str | Path,
    logger: MetricLogger | None = None,
) -> TrainResult:
    """Train a policy from the SFT model at `sft_model_path` on `{"prompt", "chosen", "rejected"}` rows;
    resumes from the newest checkpoint in `output_dir`. Returns the final policy in `output_dir/model`.

    Metrics (`dpo/` and `dpo/eval_`): loss, reward_margin, reward_accuracy, chosen_rewards, rejected_rewards,
    chosen_logps, rejected_logps; plus grad_norm, learning_rate, tokens_per_sec, peak_memory_mb.
    """
    output_dir = Path(output_dir)
    set_seed(config.seed)
    accelerator = make_accelerator(config)
    tokenizer = AutoTokenizer.from_pretrained(sft_model_path)
    config = resolve_from_rows(config, tokenizer, train_rows)
    pad_id = padding_id(tokenizer)
    model = disable_dropout(
        AutoModelForCausalLM.from_pretrained(sft_model_path, dtype=torch.float32, use_safetensors=True)
    )
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    model.to(accelerator.device)

    train_pairs = encode_preferences(tokenizer, train_rows, config)
    eval_pairs = encode_preferences(tokenizer, eval_rows, config)
    logps = reference_logps(accelerator, model, sft_model_path, train_pairs + eval_pairs, pad_id, config, output_dir)
    train_pairs = _with_reference(train_pairs, logps[: len(train_pairs)])
    eval_pairs = _with_reference(eval_pairs, logps[len(train_pairs) :])

    session = start_session(config, accelerator, model, output_dir, logger)
    stage = dpo_stage(config, pad_id, accelerator.device, packable(model))
    metrics = fit(session, stage, train_pairs, eval_pairs)
    model_dir = save_final_model(accelerator, session.model, tokenizer, output_dir)
    return TrainResult(model_dir=model_dir, metrics=metrics, resumed_from_step=session.resumed_from_step)
