"""Skip a test for a missing tool locally, but fail it in CI (`CI=true`): CI must run everything it claims to."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_unless_ci(reason: str) -> None:
    """`pytest.skip(reason)`, or `pytest.fail` when running in CI."""
    if in_ci():
        pytest.fail(f"required in CI, missing: {reason}", pytrace=False)
    pytest.skip(reason)
