"""The layers import only downward: rlhf_core ← schemas ← tasks ← flows. A file's path says what it may import.

Given every module of a layer, when its imports are read from the source (AST, so imports inside functions and
under TYPE_CHECKING count too), then none names a higher layer — and the training library names no orchestration
or tracking library at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "rlhf_core": {"schemas", "tasks", "flows", "prefect", "mlflow"},
    "schemas": {"tasks", "flows", "prefect", "mlflow"},
    "tasks": {"flows"},
}


def _imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_top_levels(path) & FORBIDDEN[layer])
        for path in sorted((REPO / layer).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}
