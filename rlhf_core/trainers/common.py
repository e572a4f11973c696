"""What every stage trainer shares: config fields, accelerate setup, data order, checkpoint/resume, the
non-finite guard, throughput/memory meters, LoRA, the frozen reference, the atomic final save, and the
supervised loop used by SFT, the reward model and DPO.

Layout of a stage's `output_dir`:

    output_dir/checkpoints/step-N/   everything for an exact resume (weights, optimizer, scheduler,
                                     GradScaler, per-process RNG of python/numpy/torch; `trainer_state.json`:
                                     step, data position, stage extras), in safetensors + JSON, never pickle,
                                     with a `manifest.json` of sizes and hashes written last (`checkpoint.py`)
    output_dir/model/                the final model, Hugging Face layout (safetensors) + tokenizer

Both are written into a hidden temporary directory, fsync'd and renamed into place (`rlhf_core.atomic`), so a
directory with the final name is complete; a checkpoint is also checked against its manifest before a resume
uses it, falling back to the newest one that matches.

Batch sizes: `batch_size` is the micro-batch of ONE process for ONE forward pass. One optimizer step consumes
`global_batch = batch_size × grad_accum_steps × num_processes` rows, and every loss is normalised by the
count of its units (tokens for SFT, pairs for RM/DPO) over that whole global batch. So 1 process × 8
accumulation steps × batch 1, 1 × 1 × 8 and 2 × 1 × 4 compute the same update (up to float rounding).

Data order: a deterministic, epoch-seeded permutation stream (`EpochPermutationSampler`); the data position
is `(epoch, index)` in that stream, saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin
from tqdm.auto import tqdm

from rlhf_core.atomic import atomic_replace_dir
from rlhf_core.callbacks import MetricLogger, NullLogger
from rlhf_core.trainers import checkpoint as ckpt

log = logging.getLogger(__name__)

MixedPrecision = Literal["no", "bf16", "fp16"]
LRSchedule = Literal["constant", "linear", "cosine"]

CHECKPOINTS_DIRNAME = "checkpoints"
MODEL_DIRNAME = "model"
STATE_FILENAME = "trainer_state.json"


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became nan/inf; training stopped before the optimizer applied it.

    `last_checkpoint` is the newest complete checkpoint (None when none was written yet): it predates the bad
    step and stays loadable.
    """

    def __init__(self, message: str, step: int, last_checkpoint: Path | None) -> None:
        super().__init__(f"{message} at step {step}; last good checkpoint: {last_checkpoint}")
        self.step = step
        self.last_checkpoint = last_checkpoint


# ------------------------------------------------------------------------------------------------------------
# Configs and results
# ------------------------------------------------------------------------------------------------------------


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
            raise ValueError(
                f"lr_schedule must be 'constant', 'linear' or 'cosine', got {self.lr_schedule!r}"
            )
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


# ------------------------------------------------------------------------------------------------------------
# Seeding and accelerate
# ------------------------------------------------------------------------------------------------------------


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
        torch.cuda.is_available()
        or bool(xpu is not None and xpu.is_available())
        or torch.backends.mps.is_available()
    )


def check_length_limits(config: object, *names: str) -> None:
    """Each named token limit of `config` is a positive int, None (no limit) or "auto" (from the data,
    `rlhf_core.lengths`)."""
    for name in names:
        value = getattr(config, name)
        if value == "auto" or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, None or 'auto', got {value!r}")


def build_optimizer(
    model: torch.nn.Module, config: TrainerConfig, own_rates: Sequence[tuple[Sequence[torch.nn.Parameter], float]] = ()
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then `config.lr_schedule`, stepped once per optimizer step (see `lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


# ------------------------------------------------------------------------------------------------------------
# LoRA and the frozen reference
# ------------------------------------------------------------------------------------------------------------


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
def reference_model(
    policy: torch.nn.Module, ref_model: torch.nn.Module | None = None
) -> Iterator[torch.nn.Module]:
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


# ------------------------------------------------------------------------------------------------------------
# Data order
# ------------------------------------------------------------------------------------------------------------


@dataclass
class DataPosition:
    """Where the next row comes from: row `index` of the permutation of `epoch`."""

    epoch: int = 0
    index: int = 0


class EpochPermutationSampler:
    """An endless stream of row indices: epoch e is `randperm(num_rows)` under seed `seed + e`.

    Stateless: the stream is a pure function of `(seed, epoch, index)`, so a `DataPosition` restores it
    exactly. A step that reaches the end of an epoch continues into the next one.
    """

    def __init__(self, num_rows: int, seed: int) -> None:
        if num_rows <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_rows = num_rows
        self.seed = seed
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        """The row order of `epoch`."""
        if self._cache is None or self._cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cache = (epoch, torch.randperm(self.num_rows, generator=generator).tolist())
        return self._cache[1]

    def take(self, position: DataPosition, count: int) -> tuple[list[int], DataPosition]:
        """The next `count` indices from `position`, and the position after them."""
        epoch, index, out = position.epoch, position.index, []
        while len(out) < count:
            if index == self.num_rows:
                epoch, index = epoch + 1, 0
            take = min(count - len(out), self.num_rows - index)
            out.extend(self.permutation(epoch)[index : index + take])
            index += take
        return out, DataPosition(epoch, index)


def shard_global_batch(
    indices: list[int], batch_size: int, grad_accum_steps: int, num_processes: int, process_index: int
) -> list[list[int]]:
    """This process's micro-batches of one optimizer step.

    The global batch is laid out as `[grad_accum_steps, num_processes, batch_size]`: micro-step a of process p
    gets `indices[(a·P + p)·B : (a·P + p + 1)·B]`.
    """
    expected = batch_size * grad_accum_steps * num_processes
    if len(indices) != expected:
        raise ValueError(f"global batch has {len(indices)} rows, expected {expected}")
    return [
        indices[(a * num_processes + process_index) * batch_size :][:batch_size]
        for a in range(grad_accum_steps)
    ]


# ------------------------------------------------------------------------------------------------------------
# Checkpoints and the final save
# ------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The loop's own state, saved as `trainer_state.json` beside the weights and optimizer in every checkpoint.

    `extra` holds JSON-serialisable stage state (e.g. a KL controller's coefficient, a prompt cursor).
    """

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        raw = json.loads(text)
        return cls(step=raw["step"], position=DataPosition(**raw["position"]), extra=raw.get("extra", {}))


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """`output_dir/checkpoints/step-N`."""
    return Path(output_dir) / CHECKPOINTS_DIRNAME / f"step-{step}"


def _checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the `step-N` dirs, oldest first; temporary `.tmp-*` dirs are not listed."""
    root = Path(output_dir) / CHECKPOINTS_DIRNAME
    if not root.is_dir():
        return []
    found = [
        (int(p.name[5:]), p) for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()
    ]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path, verify_hashes: bool = False) -> Path | None:
    """The newest complete checkpoint under `output_dir/checkpoints`, or None. Complete: its manifest lists
    every file at its size — and, with `verify_hashes` (as on resume), its sha256. A newer checkpoint that
    fails the check is skipped with a warning.

    Hashing reads the whole checkpoint (about 1 GB/s on one core: 1.5 s for a 135M-parameter model with AdamW
    state), which is why only a resume pays for it.
    """
    for step, path in reversed(_checkpoint_dirs(output_dir)):
        problem = ckpt.manifest_problem(path, check_hashes=verify_hashes)
        if problem is None:
            return path
        log.warning(
            "checkpoint step-%d in %s is incomplete or corrupt (%s); trying an older one",
            step,
            path.parent,
            problem,
        )
    return None


def save_checkpoint(session: Session, keep: int | None = None) -> Path:
    """Write the session's checkpoint (see `checkpoint.py` for the files) into `checkpoints/.tmp-step-N`, then
    its manifest; rename it to `step-N` and keep only the `keep` newest (default: `keep_checkpoints`). Call
    on every process: each writes its own RNG states. Returns the checkpoint path."""
    accelerator, state = session.accelerator, session.state
    final = checkpoint_dir(session.output_dir, state.step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    ckpt.save_rng(tmp, accelerator.process_index)
    if accelerator.is_main_process:
        ckpt.save_model_weights(tmp, session.unwrapped)
        ckpt.save_tree(tmp, "optimizer", session.optimizer.state_dict())
        ckpt.save_tree(tmp, "scheduler", session.scheduler.state_dict())
        for index, obj in enumerate(session.checkpoint_objects):
            ckpt.save_tree(tmp, f"object-{index}", obj.state_dict())
        if accelerator.scaler is not None:
            ckpt.save_tree(tmp, "scaler", accelerator.scaler.state_dict())
        (tmp / STATE_FILENAME).write_text(state.to_json())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.write_manifest(tmp)
        atomic_replace_dir(tmp, final)  # re-saving the same step (e.g. a rerun) replaces the old copy
        for _, old in _checkpoint_dirs(session.output_dir)[: -(keep or session.config.keep_checkpoints)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(session: Session, path: str | Path) -> TrainState:
    """Restore what `save_checkpoint` wrote at `path` into the session's model, optimizer, scheduler, extra
    objects, scaler and this process's RNG; return the saved `TrainState` (the session's is not replaced)."""
    path, accelerator = Path(path), session.accelerator
    ckpt.load_model_weights(path, session.unwrapped)
    session.optimizer.load_state_dict(ckpt.load_tree(path, "optimizer"))
    session.scheduler.load_state_dict(ckpt.load_tree(path, "scheduler"))
    for index, obj in enumerate(session.checkpoint_objects):
        obj.load_state_dict(ckpt.load_tree(path, f"object-{index}"))
    if accelerator.scaler is not None and (path / "scaler.json").is_file():
        accelerator.scaler.load_state_dict(ckpt.load_tree(path, "scaler"))
    if not ckpt.load_rng(path, accelerator.process_index):
        log.warning(
            "checkpoint %s has no RNG state for process %d (saved with fewer processes): random "
            "draws will differ from an uninterrupted run",
            path,
            accelerator.process_index,
        )
    return TrainState.from_json((path / STATE_FILENAME).read_text())


def save_final_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    output_dir: str | Path,
    merge_lora: bool = True,
) -> Path:
    """Save `model` (+ `tokenizer`) to `output_dir/model` in Hugging Face layout, atomically.

    Written to `output_dir/.tmp-model`, then renamed; an existing `model/` (from an earlier run) is replaced.
    With LoRA the adapters are merged into the base weights first (`merge_lora`), so the result loads with
    `AutoModel*.from_pretrained` alone; the in-memory model is consumed by the merge. Call on every process.
    """
    final = Path(output_dir) / MODEL_DIRNAME
    tmp = final.with_name(f".tmp-{MODEL_DIRNAME}")
    accelerator.wait_for_everyone()
    unwrapped = _unwrap(model)
    if merge_lora and is_peft_model(unwrapped):
        unwrapped = unwrapped.merge_and_unload()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------------------
# Meters and progress
# ------------------------------------------------------------------------------------------------------------


class ThroughputMeter:
    """Tokens per second between two `rate()` calls (wall clock)."""

    def __init__(self) -> None:
        self._tokens = 0
        self._start = time.perf_counter()

    def update(self, tokens: int) -> None:
        self._tokens += int(tokens)

    def rate(self) -> float:
        """Tokens/s since the previous call (or construction); resets the window."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        tokens_per_sec = self._tokens / elapsed
        self._tokens, self._start = 0, now
        return tokens_per_sec


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory in MiB: `torch.cuda.max_memory_allocated` on a CUDA device, else the process's peak
    resident set size (`getrusage` ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class PlainProgress:
    """What a progress bar becomes when stderr is not a terminal (a log file, CI, a Prefect worker): a plain
    line every tenth of the steps, or after `every_s` seconds without one, and one at the end —

        sft: step 30/100 (30%), loss=0.4211, 12 s elapsed, about 28 s left

    The same calls as the tqdm bar it replaces (`update`, `set_postfix`, `close`)."""

    def __init__(self, total: int, initial: int, desc: str, every_s: float = 60.0, stream: Any = None) -> None:
        self.total, self.n, self.desc, self.every_s = total, initial, desc, every_s
        self.stream = stream
        self.initial = initial
        self.start = self.last = time.monotonic()
        self.stride = max(1, math.ceil(total / 10))
        self.postfix: dict[str, Any] = {}
        self.printed = initial

    def set_postfix(self, values: dict[str, Any]) -> None:
        self.postfix = dict(values)

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = time.monotonic()
        if self.n // self.stride > before // self.stride or now - self.last >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last, self.printed = now, self.n
        elapsed = now - self.start
        done = self.n - self.initial
        parts = [f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        parts.append(f"{_clock(elapsed)} elapsed")
        if 0 < done and self.n < self.total:
            parts.append(f"about {_clock(elapsed / done * (self.total - self.n))} left")
        # Written, not print()ed: a Prefect flow with log_prints turns prints into log records.
        stream = self.stream or sys.stderr
        stream.write(", ".join(parts) + "\n")
        stream.flush()

    def close(self) -> None:
        """The last line: the final step and metric, unless the last update printed them already."""
        if self.n != self.printed:
            self._line(time.monotonic())


def _clock(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm | PlainProgress:
    """A tqdm bar over optimizer steps (steps done/total, the key metric, time left) when stderr is a terminal,
    else `PlainProgress`'s periodic lines; silent unless `enabled`."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, initial, desc)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
    )


# ------------------------------------------------------------------------------------------------------------
# A training session: accelerator + prepared model/optimizer/scheduler + resume
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything one stage run holds; built by `start_session`. `model` is the accelerate-prepared model
    (DDP-wrapped when distributed); use `unwrapped` for generation or saving."""

    config: TrainerConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    output_dir: Path
    logger: MetricLogger
    state: TrainState
    resumed_from_step: int | None
    checkpoint_objects: tuple[Any, ...] = ()

    @property
    def unwrapped(self) -> torch.nn.Module:
        return _unwrap(self.model)

    def log(self, metrics: dict[str, float]) -> None:
        """Send `metrics` at the current step to the logger, from the main process only."""
        if self.accelerator.is_main_process:
            self.logger.log_metrics(metrics, self.state.step)


def start_session(
    config: TrainerConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    output_dir: str | Path,
    logger: MetricLogger | None = None,
    checkpoint_objects: Sequence[Any] = (),
    own_rates: Sequence[tuple[Sequence[torch.nn.Parameter], float]] = (),
) -> Session:
    """Prepare `model` and a fresh AdamW + scheduler with `accelerator`, then resume from the newest complete
    checkpoint of `output_dir` if there is one.

    `checkpoint_objects` are extra objects with `state_dict()`/`load_state_dict()` saved in every checkpoint
    (e.g. a PPO value-head optimizer or KL controller). Only the trained model goes through `prepare`; frozen
    models (reference, reward model) just move to `accelerator.device`, so checkpoints never hold them.
    """
    output_dir = Path(output_dir)
    optimizer = build_optimizer(model, config, own_rates)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not prepared: accelerate would step it once per process per step.
    scheduler = build_scheduler(optimizer, config)
    session = Session(
        config,
        accelerator,
        model,
        optimizer,
        scheduler,
        output_dir,
        logger or NullLogger(),
        TrainState(),
        None,
        tuple(checkpoint_objects),
    )
    latest = _resume_point(accelerator, output_dir)
    if latest is not None:
        session.state = load_checkpoint(session, latest)
        session.resumed_from_step = session.state.step
    return session


def _resume_point(accelerator: Accelerator, output_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their hashes, chosen by the main process (one process reads
    the checkpoint to hash it, not all) and sent to the others."""
    latest = latest_checkpoint(output_dir, verify_hashes=True) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        latest = broadcast_object_list([latest])[0]
    return latest


def all_reduce_sum(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum each value over all processes (float64 on the wire, so counts stay exact). Same keys required
    on every process."""
    if accelerator.num_processes == 1:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    summed = accelerator.reduce(packed, reduction="sum")
    return dict(zip(keys, summed.tolist(), strict=True))


def backward_normalized(session: Session, loss_sum: torch.Tensor, global_count: float) -> None:
    """Backward of this micro-batch's share of the step loss `L = Σ_micro-batches loss_sum / global_count`.

    accelerate divides every backward by `grad_accum_steps` and DDP averages gradients over processes; both
    are undone here so the accumulated gradient is exactly ∇L whatever the split.
    """
    scale = session.accelerator.num_processes * session.config.grad_accum_steps / max(global_count, 1.0)
    session.accelerator.backward(loss_sum * scale)


def ensure_finite(session: Session, value: float, what: str) -> None:
    """Raise `NonFiniteLossError` when `value` (already reduced over processes, so every process agrees) is
    nan or inf; the on-disk checkpoints are untouched."""
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"non-finite {what} ({value})", session.state.step, latest_checkpoint(session.output_dir)
        )


def optimizer_step(session: Session) -> dict[str, float]:
    """Clip, check, apply and clear the accumulated gradient; advance the scheduler and `state.step`.

    Returns `{"grad_norm": ‖g‖ before clipping, "learning_rate": lr used for this step}`. A non-finite norm
    raises before the optimizer changes anything (with fp16 the GradScaler's own inf-skip comes first: an
    overflowing step is skipped by the scaler, not an error).
    """
    accelerator, config = session.accelerator, session.config
    params = [p for p in session.model.parameters() if p.requires_grad]
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
    grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
    if accelerator.scaler is None:
        ensure_finite(session, grad_norm, "gradient norm")
    learning_rate = session.scheduler.get_last_lr()[0]
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.scheduler.step()
    session.state.step += 1
    return {"grad_norm": grad_norm, "learning_rate": learning_rate}


def ensure_finite_weights(session: Session) -> None:
    """Raise `NonFiniteLossError` if any trained weight is nan/inf (checked before a checkpoint is written, so
    a step that was finite in loss and gradient but still broke the weights never becomes the "last good"
    checkpoint)."""
    bad = any(not bool(torch.isfinite(p).all()) for p in session.model.parameters() if p.requires_grad)
    flag = all_reduce_sum(session.accelerator, {"bad": float(bad)})["bad"]
    if flag:
        raise NonFiniteLossError(
            "non-finite weights after the update", session.state.step, latest_checkpoint(session.output_dir)
        )


def maybe_checkpoint(session: Session) -> Path | None:
    """Checkpoint when `state.step` is a multiple of `checkpoint_every` or the last step (weights checked
    finite first)."""
    every, step = session.config.checkpoint_every, session.state.step
    if every and (step % every == 0 or step == session.config.max_steps):
        ensure_finite_weights(session)
        return save_checkpoint(session)
    return None


# ------------------------------------------------------------------------------------------------------------
# The supervised loop (SFT, reward model, DPO)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """What a supervised stage plugs into `fit`.

    collate(rows) -> batch: tensors for one micro-batch (on `accelerator.device`).
    count(batch) -> float: the loss's normalisation units in the batch (response tokens, pairs).
    loss(model, batch) -> (loss_sum, sums): the loss summed over the units (with grad) and detached
        diagnostics as sums over the batch, which must include "loss" and "tokens" (tokens processed).
    summarize(sums) -> metrics: metric values from sums reduced over the global batch (or eval set); keys
        without the stage prefix.
    """

    name: str
    collate: Callable[[list[dict]], Any]
    count: Callable[[Any], float]
    loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
    summarize: Callable[[dict[str, float]], dict[str, float]]
    key_metric: str = "loss"


def _train_step(session: Session, stage: Stage, micro_rows: list[list[dict]]) -> dict[str, float]:
    """One optimizer step over this process's micro-batches; returns un-prefixed metrics."""
    accelerator = session.accelerator
    batches = [stage.collate(rows) for rows in micro_rows]
    global_count = all_reduce_sum(accelerator, {"n": sum(stage.count(b) for b in batches)})["n"]
    sums: dict[str, float] = {}
    session.model.train()
    for batch in batches:
        with accelerator.accumulate(session.model):
            loss_sum, batch_sums = stage.loss(session.model, batch)
            backward_normalized(session, loss_sum, global_count)
        for key, value in batch_sums.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    sums = all_reduce_sum(accelerator, sums)
    ensure_finite(session, sums["loss"], "loss")
    return {**stage.summarize(sums), **optimizer_step(session), "tokens": sums["tokens"]}


def evaluate(session: Session, stage: Stage, rows: Sequence[dict]) -> dict[str, float]:
    """Metrics over all of `rows` (sharded over processes, sums reduced), prefixed `<stage>/eval_`."""
    if not rows:
        return {}
    accelerator, model = session.accelerator, session.unwrapped
    size = session.config.eval_batch_size or session.config.batch_size
    shard = list(rows)[accelerator.process_index :: accelerator.num_processes]
    sums: dict[str, float] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(shard), size):
            _, batch_sums = stage.loss(model, stage.collate(shard[start : start + size]))
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + float(value)
    model.train(was_training)
    # A process with an empty shard still has to join the reduction with the same keys.
    keys = all_keys(accelerator, sums)
    sums = all_reduce_sum(accelerator, {k: sums.get(k, 0.0) for k in keys})
    return {f"{stage.name}/eval_{k}": v for k, v in stage.summarize(sums).items()}


def all_keys(accelerator: Accelerator, values: dict[str, float]) -> list[str]:
    """The union of `values`' keys over all processes, sorted."""
    if accelerator.num_processes == 1:
        return sorted(values)
    from accelerate.utils import gather_object

    return sorted({k for keys in gather_object([sorted(values)]) for k in keys})


def fit(
    session: Session, stage: Stage, train_rows: Sequence[dict], eval_rows: Sequence[dict]
) -> dict[str, float]:
    """The loop of SFT, RM and DPO, from `state.step` to `max_steps`:

    1. take the next global batch from the seeded permutation stream and keep this process's micro-batches;
    2. forward/backward each micro-batch, the loss normalised over the global batch (`backward_normalized`);
    3. stop on a non-finite loss or gradient norm; else clip, step, advance the schedule;
    4. checkpoint (every `checkpoint_every`), then log (every `log_every`) and evaluate (every `eval_every`).

    Returns the last logged metrics merged with a final evaluation.
    """
    config, accelerator, state = session.config, session.accelerator, session.state
    train_rows = list(train_rows)
    sampler = EpochPermutationSampler(len(train_rows), config.seed)
    global_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
    meter, last = ThroughputMeter(), {}
    bar = progress_bar(
        config.max_steps, state.step, stage.name, config.progress_bar and accelerator.is_main_process
    )
    while state.step < config.max_steps:
        indices, state.position = sampler.take(state.position, global_batch)
        micro = shard_global_batch(
            indices,
            config.batch_size,
            config.grad_accum_steps,
            accelerator.num_processes,
            accelerator.process_index,
        )
        step_metrics = _train_step(session, stage, [[train_rows[i] for i in m] for m in micro])
        meter.update(int(step_metrics.pop("tokens")))
        maybe_checkpoint(session)
        metrics = {f"{stage.name}/{k}": v for k, v in step_metrics.items()}
        bar.set_postfix({stage.key_metric: f"{step_metrics[stage.key_metric]:.4f}"})
        bar.update(1)
        done = state.step == config.max_steps
        if state.step % config.log_every == 0 or done:
            metrics[f"{stage.name}/tokens_per_sec"] = meter.rate()
            metrics[f"{stage.name}/peak_memory_mb"] = peak_memory_mb(accelerator.device)
            session.log(metrics)
            last = metrics
        if config.eval_every and state.step % config.eval_every == 0 and not done:
            session.log(evaluate(session, stage, eval_rows))
    bar.close()
    final_eval = evaluate(session, stage, eval_rows)
    if final_eval:
        session.log(final_eval)
    return {**last, **final_eval}
