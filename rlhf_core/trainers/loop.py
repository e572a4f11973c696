"""The training loop every trainer shares (`train_loop`), and the supervised step of SFT, the reward model and DPO:
a `Stage` plugs its batches and loss into `fit`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from rlhf_core.trainers.data_order import EpochPermutationSampler, shard_global_batch
from rlhf_core.trainers.session import (
    Session,
    ThroughputMeter,
    all_reduce_sum,
    backward_normalized,
    ensure_finite,
    maybe_checkpoint,
    optimizer_step,
    peak_memory_mb,
    progress_bar,
)

log = logging.getLogger(__name__)


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


@dataclass
class StepOutcome:
    """What one step of a training loop reports to `train_loop`."""

    metrics: dict[str, float]
    """Prefixed metrics of the step (`sft/loss`, `ppo/kl`, …), logged every `log_every` steps and at the end."""
    progress: dict[str, str]
    """What the progress bar shows beside the step count (the key metric, formatted)."""


def train_loop(
    session: Session,
    name: str,
    step: Callable[[bool], StepOutcome],
    evaluate: Callable[[], dict[str, float]],
) -> dict[str, float]:
    """The loop every trainer shares, from `state.step` to `max_steps`:

        while state.step < max_steps:
            outcome = step(log_now)     # trains, advances state.step by one (an optimizer step, a PPO iteration)
            checkpoint                  # every checkpoint_every steps and at the last
            progress bar; log           # every log_every steps and at the last
            evaluate                    # every eval_every steps (not the last: the final evaluation follows)
        final evaluation

    `log_now` tells the step whether its metrics will be logged, so a metric measured over the logging window
    (tokens/s) is measured only then. Returns the last logged metrics merged with the final evaluation.
    """
    config, accelerator, state = session.config, session.accelerator, session.state
    bar = progress_bar(config.max_steps, state.step, name, config.progress_bar and accelerator.is_main_process)
    last: dict[str, float] = {}
    while state.step < config.max_steps:
        log_now = (state.step + 1) % config.log_every == 0 or state.step + 1 == config.max_steps
        outcome = step(log_now)
        maybe_checkpoint(session)
        bar.set_postfix(outcome.progress)
        bar.update(1)
        done = state.step == config.max_steps
        if log_now:
            session.log(outcome.metrics)
            last = outcome.metrics
        if config.eval_every and state.step % config.eval_every == 0 and not done:
            session.log(evaluate())
    bar.close()
    final_eval = evaluate()
    if final_eval:
        session.log(final_eval)
    return {**last, **final_eval}


def fit(session: Session, stage: Stage, train_rows: Sequence[dict], eval_rows: Sequence[dict]) -> dict[str, float]:
    """The supervised step of SFT, RM and DPO inside `train_loop`:

    1. take the next global batch from the seeded permutation stream and keep this process's micro-batches;
    2. forward/backward each micro-batch, the loss normalised over the global batch (`backward_normalized`);
    3. stop on a non-finite loss or gradient norm; else clip, step, advance the schedule.

    Returns the last logged metrics merged with a final evaluation on `eval_rows`.
    """
    config, accelerator, state = session.config, session.accelerator, session.state
    train_rows = list(train_rows)
    sampler = EpochPermutationSampler(len(train_rows), config.seed)
    global_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
    meter = ThroughputMeter()

    def step(log_now: bool) -> StepOutcome:
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
        metrics = {f"{stage.name}/{k}": v for k, v in step_metrics.items()}
        if log_now:
            metrics[f"{stage.name}/tokens_per_sec"] = meter.rate()
            metrics[f"{stage.name}/peak_memory_mb"] = peak_memory_mb(accelerator.device)
        return StepOutcome(metrics, {stage.key_metric: f"{step_metrics[stage.key_metric]:.4f}"})

    return train_loop(session, stage.name, step, lambda: evaluate(session, stage, eval_rows))
