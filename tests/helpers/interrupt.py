"""A metric logger that stands in for a crash: it raises when the trainer reports a given step."""

from __future__ import annotations


class InterruptAt:
    """A logger that kills the run (raises) when it sees step `step`: the in-process stand-in for a crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt(f"killed at step {step}")
