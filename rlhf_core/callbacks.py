"""How trainers report: a tiny logger protocol, so the core never imports a tracking library.

Orchestration (tasks/) adapts this to MLflow; tests use `ListLogger`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class MetricLogger(Protocol):
    """Receives step metrics from a trainer. Names are namespaced by stage (`sft/loss`, `ppo/kl`, ...)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullLogger:
    """Drops everything; the default when no logger is given."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None


class ListLogger:
    """Keeps every `(step, metrics)` in memory; handy in tests and notebooks."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))

    def series(self, name: str) -> list[float]:
        """All logged values of one metric, in logging order."""
        return [m[name] for _, m in self.records if name in m]


class FanOutLogger:
    """Sends every call to several loggers (e.g. MLflow and a progress bar)."""

    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = loggers

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)
