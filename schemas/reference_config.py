"""The reference config (`configs/reference.yaml`): every key with its default and its docstring as a comment,
rendered from the code so it never drifts from it (`python -m flows.config --reference`)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import fields, is_dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from schemas.config import parse_config

REFERENCE_EXAMPLE: dict[str, Any] = {
    "name": "reference",
    "datasets": {
        "demonstrations": {"path": "data/support_bot/demonstrations.jsonl"},
        "preferences": {"path": "data/support_bot/preferences.jsonl"},
        "prompts_train": {"path": "data/support_bot/prompts_train.jsonl"},
        "prompts_eval": {"path": "data/support_bot/prompts_eval.jsonl"},
    },
}


def dataclass_field_docs(cls: type) -> dict[str, str]:
    """`{field: docstring}` of a dataclass and its dataclass bases (the string literal after each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _scalar(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _render(obj: Any, indent: int, out: list[str]) -> None:
    if isinstance(obj, BaseModel):
        items = [(name, getattr(obj, name), field.description or "") for name, field in type(obj).model_fields.items()]
    else:
        docs = dataclass_field_docs(type(obj))
        items = [(f.name, getattr(obj, f.name), docs.get(f.name, "")) for f in fields(obj)]
    pad = " " * indent
    for name, value, doc in items:
        out.extend(f"{pad}# {line}".rstrip() for line in (doc or name).splitlines())
        if isinstance(value, BaseModel) or (is_dataclass(value) and not isinstance(value, type)):
            out.append(f"{pad}{name}:")
            _render(value, indent + 2, out)
        else:
            out.append(f"{pad}{name}: {_scalar(value)}")


def render_reference_config() -> str:
    """`configs/reference.yaml`: every key with its default and its docstring as a comment."""
    out = [
        "# Reference pipeline config: every key, its default value and what it means.",
        "# Generated from the docstrings of schemas/config.py and the rlhf_core config dataclasses:",
        "#   python -m flows.config --reference > configs/reference.yaml",
        "# `lora: null` means full fine-tuning; for adapters write e.g. `lora: {r: 8, alpha: 16}`",
        "# (fields: r, alpha, dropout, target_modules — see rlhf_core.trainers.config.LoRAConfig).",
        "",
    ]
    _render(parse_config(REFERENCE_EXAMPLE, "reference"), 0, out)
    return "\n".join(out) + "\n"
