"""The fields every stage trainer shares (`TrainerConfig`, `LoRAConfig`) and what a `train_<stage>` returns."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)


MixedPrecision = Literal["no", "bf16", "fp16"]


LRSchedule = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (peft) on the attention and MLP projections; the base weights stay frozen."""

    r: int = 8
    """Rank of the update ΔW = B·A."""
    alpha: int = 16
    """Scale: ΔW is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input; 0 keeps policy log-probs deterministic (docs/pitfalls.md §6)."""
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Names of the linear layers that get adapters (Llama naming)."""

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError(f"LoRA r and alpha must be > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must not be empty")


@dataclass(frozen=True)
class TrainerConfig:
    """Fields shared by every stage; each stage's config extends it (all fields have defaults)."""

    seed: int = 0
    """Seeds python, numpy and torch (model init of new heads, LoRA init, data order)."""
    max_steps: int = 100
    """Number of optimizer steps."""
    batch_size: int = 8
    """Rows per forward pass on one process (the micro-batch)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `learning_rate` over this many steps."""
    lr_schedule: LRSchedule = "constant"
    """After warm-up: stay constant, or decay linearly / with a cosine to 0 at `max_steps`."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient L2 norm to this value (None: no clipping; the norm is still logged)."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps and at the last step (0: never)."""
    keep_checkpoints: int = 2
    """How many newest checkpoints to keep on disk."""
    mixed_precision: MixedPrecision = "no"
    """Autocast precision; falls back to "no" where the device lacks it (fp16 without CUDA)."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of all weights (None: full fine-tuning)."""
    log_every: int = 1
    """Report training metrics every N steps (and always at the last step)."""
    eval_every: int = 0
    """Evaluate on the held-out rows every N steps (0: only at the end)."""
    eval_batch_size: int | None = None
    """Rows per evaluation forward pass on one process (None: `batch_size`)."""
    progress_bar: bool = True
    """Show a progress bar with the key metric (only on a TTY, only on the main process)."""

    def __post_init__(self) -> None:
        positive = {
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "keep_checkpoints": self.keep_checkpoints,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 < self.learning_rate < math.inf) or self.weight_decay < 0:
            raise ValueError(
                f"need learning_rate > 0 and weight_decay >= 0, got {self.learning_rate}, {self.weight_decay}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {self.lr_schedule!r}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ValueError(f"eval_batch_size must be > 0 or None, got {self.eval_batch_size}")


@dataclass(frozen=True)
class TrainResult:
    """What a `train_<stage>` call returns."""

    model_dir: Path
    """`output_dir/model`: the final model in Hugging Face layout, complete."""
    metrics: dict[str, float]
    """The last logged training metrics merged with the final evaluation."""
    resumed_from_step: int | None
    """Step of the checkpoint this call resumed from (None: started fresh)."""


def check_length_limits(config: object, *names: str) -> None:
    """Each named token limit of `config` is a positive int, None (no limit) or "auto" (from the data,
    `rlhf_core.lengths`)."""
    for name in names:
        value = getattr(config, name)
        if value == "auto" or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, None or 'auto', got {value!r}")
