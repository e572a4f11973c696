"""What a user sees when data is rejected: one `Failure` per problem, gathered in a `ValidationReport`, raised as
a `DataValidationError`.

Row numbering (the same for every format): `row` is the 1-based position of the record in the source — the
first data record is row 1, a CSV header is not a row, blank JSONL lines are not rows. For line-based files
(JSONL, CSV) `line` is also given: the 1-based line of the file where the record starts, so an editor jumps
straight to it. A failure about the whole source (missing file, missing column) has `row = None`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_VALUE_CHARS = 80


def truncate_value(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """`value` as compact JSON (strings quoted, so blanks are visible), cut to `limit` characters with `…`."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # circular structures cannot come from a file, but never fail while reporting
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Failure:
    """One problem: where (`source`, `row`, `line`, `column`), which `rule`, why (`message`), and the offending
    `value` (already truncated)."""

    source: str
    row: int | None
    line: int | None
    column: str | None
    rule: str
    message: str
    value: str = ""

    def where(self) -> str:
        parts = [self.source]
        if self.row is not None:
            parts.append(f"row {self.row}" + (f" (line {self.line})" if self.line is not None else ""))
        elif self.line is not None:
            parts.append(f"line {self.line}")
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        value = f"; value: {self.value}" if self.value else ""
        return f"{self.where()}: [{self.rule}] {self.message}{value}"


def _one_line(text: str) -> str:
    return re.sub(r"\r\n|\r|\n", " ", text)


def code_span(text: str) -> str:
    """`text` as one Markdown (CommonMark) code span on one line: line breaks become spaces, the fence is one
    backtick longer than the longest run of backticks inside, and content that starts or ends with a backtick
    (or with a space at both ends) is padded by one space, which the renderer strips again."""
    text = _one_line(text)
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" or (text[:1] == text[-1:] == " " and text.strip()) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_block(text: str) -> str:
    """`text` as a fenced Markdown code block whose fence (at least ```) is longer than any backtick run in it."""
    fence = "`" * max(3, max(map(len, re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}\n{text}\n{fence}"


def _cell(text: str) -> str:
    """A GFM table cell: one line, pipes escaped (a table splits cells at `|`, even inside a code span)."""
    return _one_line(text).replace("|", "\\|")


@dataclass(frozen=True)
class ValidationReport:
    """Every failure of one source, in row order. Iterable; `to_markdown()` / `to_json()` for artifacts."""

    source: str
    kind: str
    failures: Sequence[Failure] = field(default_factory=tuple)
    num_rows: int | None = None
    format: str | None = None

    def __iter__(self) -> Iterator[Failure]:
        return iter(self.failures)

    def __len__(self) -> int:
        return len(self.failures)

    @property
    def failing_rows(self) -> list[int]:
        return sorted({f.row for f in self.failures if f.row is not None})

    def summary(self) -> str:
        rows = self.failing_rows
        scope = f"{len(rows)} failing row(s)" if rows else "the source as a whole"
        total = f" of {self.num_rows}" if self.num_rows is not None and rows else ""
        return f"{self.source}: invalid {self.kind} data: {len(self.failures)} failure(s) in {scope}{total}"

    def to_text(self) -> str:
        return "\n".join([self.summary() + ":", *(f"  {f}" for f in self.failures)])

    def to_markdown(self) -> str:
        lines = [
            f"**{_cell(self.summary())}**",
            "",
            "| row | line | column | rule | problem | value |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for f in self.failures:
            cells = [
                "" if f.row is None else str(f.row),
                "" if f.line is None else str(f.line),
                _cell(f.column or ""),
                _cell(f.rule),
                _cell(f.message),
                _cell(code_span(f.value)) if f.value else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "format": self.format,
            "num_rows": self.num_rows,
            "failures": [asdict(f) for f in self.failures],
        }


class DataValidationError(Exception):
    """Data that must not reach a trainer. `str(error)` lists every failure (file, row, line, column, rule,
    value); `.report` is the structured `ValidationReport`; `.write_report(path)` saves it for a run."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.to_text())
        self.report = report

    @property
    def failures(self) -> Sequence[Failure]:
        return self.report.failures

    def write_report(self, path: str | Path) -> Path:
        """Write the report to `path`: JSON when it ends in `.json`, Markdown otherwise. Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.report.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            path.write_text(f"# Data validation failed\n\n{self.report.to_markdown()}", encoding="utf-8")
        return path


def source_error(
    source: str, kind: str, rule: str, message: str, *, line: int | None = None, value: Any = None
) -> DataValidationError:
    """An error about the source as a whole (unreadable, empty, unsupported) as a one-failure report."""
    shown = "" if value is None else truncate_value(value)
    failure = Failure(source=source, row=None, line=line, column=None, rule=rule, message=message, value=shown)
    return DataValidationError(ValidationReport(source=source, kind=kind, failures=(failure,)))
