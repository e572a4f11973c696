"""`load_rows`: any supported source → validated canonical rows, or a `DataValidationError` naming every bad row.

    source ──read──▶ raw records (row, line) ──format──▶ canonical rows ──pandera──▶ LoadedData
                     missing / empty / bad JSON    TRL, HH-RLHF, messages    every rule, lazily

Errors from all three steps use the same `Failure` shape and always point at the row of the user's file, even
after a format conversion changed the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.errors import DataValidationError, Failure, ValidationReport, source_error, truncate_value
from schemas.formats import FORMATS, RowProblem, converter, detect_format
from schemas.models import COLUMNS, check_kind, sort_failures, validate_rows
from schemas.readers import read_source
from schemas.rows import content_digest
from schemas.rules import DataLimits


@dataclass(frozen=True)
class LoadedData:
    """Validated canonical rows of one source."""

    rows: list[dict[str, Any]]
    """Canonical rows (docs/architecture.md), in source order."""
    kind: str
    """demonstration | preference | ranking | prompt."""
    source: str
    """The path or dataset name as given."""
    format: str
    """The format the rows were recognised as (`schemas.formats.FORMATS`)."""
    digest: str
    """`content_digest(rows)`: sha256 over every canonical row."""

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def load_rows(
    source: str | Path,
    kind: str,
    *,
    format: str | None = None,
    split: str | None = None,
    limits: DataLimits | None = None,
    allow_extra_columns: bool = False,
    conversational: bool | None = None,
) -> LoadedData:
    """Read, convert and validate `source` as `kind` rows; raises `DataValidationError` listing every failure.

    `format`: a hint from `FORMATS` (None: detected from the columns); `split`: the split of a hub dataset or
    `DatasetDict` directory (default `train`); `limits`: size limits (`DataLimits()`); `allow_extra_columns`:
    keep columns the kind does not define instead of rejecting them; `conversational`: require message lists
    (True) or strings (False) instead of accepting either.
    """
    check_kind(kind)
    records = read_source(source, kind, split)
    label = records.source
    fmt = format or detect_format(kind, {k for row in records.rows for k in row}, records.rows)
    if fmt not in FORMATS:
        raise source_error(label, kind, "format", f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    try:
        convert = converter(kind, fmt)
    except ValueError as exc:
        raise source_error(label, kind, "format", str(exc)) from None
    lines = {i: line for i, line in enumerate(records.lines, start=1) if line is not None}
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    failures: list[Failure] = []
    for number, raw in enumerate(records.rows, start=1):
        try:
            rows.append(convert(raw))
            numbers.append(number)
        except RowProblem as problem:
            value = raw.get(problem.column, raw) if problem.column in raw else raw
            failures.append(
                Failure(
                    label,
                    number,
                    lines.get(number),
                    problem.column,
                    problem.rule,
                    f"{problem.message} ({fmt} format)",
                    truncate_value(value),
                )
            )
    failures += validate_rows(
        rows,
        kind,
        source=label,
        row_numbers=numbers,
        lines=lines,
        limits=limits,
        allow_extra_columns=allow_extra_columns,
        conversational=conversational,
    )
    if failures:
        report = ValidationReport(
            label, kind, tuple(sort_failures(failures, COLUMNS[kind])), num_rows=len(records.rows), format=fmt
        )
        raise DataValidationError(report)
    return LoadedData(rows=rows, kind=kind, source=label, format=fmt, digest=content_digest(rows))
