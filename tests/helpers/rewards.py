"""Reward functions `f(prompt, response_text) -> float` for trainer tests on the untrained tiny model (whose
samples are near-random tokens that never end)."""

from __future__ import annotations


def letter_share(prompt: object, text: str) -> float:
    """Share of the response's characters that are letters: varies between random samples, so it carries signal."""
    return sum(c.isalpha() for c in text) / max(len(text), 1)


def constant(prompt: object, text: str) -> float:
    """The same score for everything: no signal at all."""
    return 1.0
