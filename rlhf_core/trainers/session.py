"""A training session: the prepared model, optimizer and schedule with their resume point, and the steps every
loop shares (normalised backward, the non-finite guard, the optimizer step, meters, periodic checkpoints)."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from rlhf_core.callbacks import MetricLogger, NullLogger
from rlhf_core.trainers.config import (
    TrainerConfig,
)
from rlhf_core.trainers.setup import (
    _unwrap,
    build_optimizer,
    build_scheduler,
)
from rlhf_core.trainers.state import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became nan/inf; training stopped before the optimizer applied it.

    `last_checkpoint` is the newest complete checkpoint (None when none was written yet): it predates the bad
    step and stays loadable.
    """

    def __init__(self, message: str, step: int, last_checkpoint: Path | None) -> None:
        super().__init__(f"{message} at step {step}; last good checkpoint: {last_checkpoint}")
        self.step = step
        self.last_checkpoint = last_checkpoint


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
