"""`scripts/mutation_check.py`'s curated inversions still point at real code (fast; the mutation run itself is slow
and by hand, docs/testing.md). A refactor or `ruff format` that moves or rewraps a guarded line must update the
list, or the check would report the mutation as `not applicable` instead of testing it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mutations() -> tuple:
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutation_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.MUTATIONS


@pytest.mark.parametrize("mutation", _mutations(), ids=lambda m: m.name)
def test_each_mutation_applies_to_exactly_one_place_and_names_existing_tests(mutation) -> None:
    source = (ROOT / mutation.path).read_text()
    assert source.count(mutation.original) == 1, f"{mutation.path}: the original line is gone or repeated"
    assert mutation.mutated != mutation.original
    for test in mutation.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        assert not name or f"def {name}(" in (ROOT / path).read_text(), test
