"""Setting a trainer up: seeding, the accelerator, AdamW and its schedule, LoRA and the frozen reference."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin

from rlhf_core.trainers.config import (
    LoRAConfig,
    MixedPrecision,
    TrainerConfig,
)

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed python's `random`, numpy and torch (all devices) with the same value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def supported_mixed_precision(requested: MixedPrecision) -> MixedPrecision:
    """`requested` if this machine can run it, else "no": fp16 needs CUDA; bf16 needs CPU autocast or a
    CUDA device with bf16 support."""
    if requested == "fp16" and not torch.cuda.is_available():
        return "no"
    if requested == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "no"
    return requested


def make_accelerator(config: TrainerConfig) -> Accelerator:
    """An `Accelerator` for one training run: gradient accumulation and mixed precision from `config`.

    Works as a plain single CPU process and under `accelerate launch` / `torchrun` (DDP, FSDP). accelerate
    keeps process-wide singletons; they are reset here (not the distributed process group) so several runs in
    one Python process — tests, notebooks — each get the settings of their own config.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=config.grad_accum_steps, sync_with_dataloader=False)
    accelerator = Accelerator(
        # Without `cpu=True` accelerate ignores a torchrun launch on a machine with no accelerator device
        # (every process would train alone); with it, the processes join one gloo group.
        cpu=not _has_accelerator_device(),
        mixed_precision=supported_mixed_precision(config.mixed_precision),
        gradient_accumulation_plugin=plugin,
        step_scheduler_with_optimizer=False,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched with WORLD_SIZE={launched} but accelerate runs {accelerator.num_processes} "
            "process(es): the processes would not share gradients"
        )
    return accelerator


def _has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available() or bool(xpu is not None and xpu.is_available()) or torch.backends.mps.is_available()
    )


def build_optimizer(
    model: torch.nn.Module,
    config: TrainerConfig,
    own_rates: Sequence[tuple[Sequence[torch.nn.Parameter], float]] = (),
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights (1-D tensors) get no weight decay.

    `own_rates`: `(parameters, peak learning rate)` for parameters that learn at their own rate (PPO's value
    head); the schedule scales every group alike."""
    params = [p for p in model.parameters() if p.requires_grad]
    special = {id(p): lr for group, lr in own_rates for p in group}
    groups = []
    for lr in dict.fromkeys((config.learning_rate, *special.values())):
        mine = [p for p in params if special.get(id(p), config.learning_rate) == lr]
        groups += [
            {"params": [p for p in mine if p.ndim >= 2], "weight_decay": config.weight_decay, "lr": lr},
            {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
        ]
    # The fused kernel does the whole update in one pass per tensor (SFT step time -15% on CPU, bench/RESULTS.md);
    # it needs floating-point parameters on a device that has it.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate, fused=fused or None)


def lr_factor(step: int, config: TrainerConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    warm-up: (step + 1) / warmup_steps; then constant 1, linear (1 − p) or cosine ½(1 + cos πp), with p the
    fraction of the post-warm-up steps done.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then `config.lr_schedule`, stepped once per optimizer step (see `lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


def apply_lora(
    model: torch.nn.Module,
    lora: LoRAConfig,
    task_type: str = "CAUSAL_LM",
    modules_to_save: Sequence[str] | None = None,
) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters; only the adapters (and `modules_to_save`, e.g. a reward or value
    head that must be trained in full) require grad. The adapter's B matrix starts at 0, so the wrapped model
    computes exactly the base model until the first update."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    return get_peft_model(model, peft_config)


def is_peft_model(model: torch.nn.Module) -> bool:
    """True for a peft-wrapped model (LoRA adapters)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and `requires_grad=False` on every parameter: a frozen reference or reward model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def reference_model(policy: torch.nn.Module, ref_model: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
    """The frozen reference π_ref, to run forward passes on under `torch.no_grad()` and eval mode.

    With a separate `ref_model` (full fine-tuning) it is yielded as is. Without one, `policy` must be a LoRA
    (peft) model and the reference is the same model with its adapters disabled — the base weights are
    frozen under LoRA, so this is exactly the initial policy, without a second copy in memory. The policy's
    train/eval mode is restored on exit. `policy` may be the accelerate-wrapped model.
    """
    if ref_model is not None:
        with torch.no_grad():
            yield ref_model
        return
    model = _unwrap(policy)
    if not is_peft_model(model):
        raise ValueError("no ref_model given and the policy has no LoRA adapters to disable")
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/FSDP/compile wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)
