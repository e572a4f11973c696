"""pandera schemas of the four row kinds, and `validate_rows`, which runs one lazily and turns pandera's failure
table into `Failure`s that point at the original file's rows.

| kind | columns | value rules (per column) | row rules |
| --- | --- | --- | --- |
| demonstration | prompt, response | see `schemas.rules` | no duplicate rows |
| preference | prompt, chosen, rejected | | chosen ≠ rejected, same format, no duplicate rows |
| ranking | prompt, responses (best → worst) | K ∈ [2, max], distinct | no duplicate rows |
| prompt | prompt | | no duplicate rows |

Every column is required (a missing value is rule `required`), unknown columns are rejected (rule
`unknown_column`) unless `allow_extra_columns`. Each kind has a plain-text variant (`conversational=False`: strings
only), a conversational one (`True`: message lists only) and the permissive default (`None`: either, per value).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import pandas as pd
import pandera.pandas as pa

from schemas.errors import Failure, truncate_value
from schemas.rules import DataLimits, ValueRule, prompt_rules, ranking_rules, response_rules

KINDS = ("demonstration", "preference", "ranking", "prompt")
COLUMNS: dict[str, tuple[str, ...]] = {
    "demonstration": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "ranking": ("prompt", "responses"),
    "prompt": ("prompt",),
}
ROW_RULE_COLUMNS = {
    "chosen_differs_from_rejected": "chosen, rejected",
    "same_format": "chosen, rejected",
    "no_duplicate_rows": "*",
}


def canonical_json(value: Any) -> str:
    """The one serialisation used for equality, duplicates and digests: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")


def column_rules(kind: str, limits: DataLimits, conversational: bool | None) -> dict[str, dict[str, ValueRule]]:
    """Rule name → rule, for every column of `kind`."""
    check_kind(kind)
    rules = {"prompt": prompt_rules(limits, conversational)}
    for column in COLUMNS[kind][1:]:
        rules[column] = (ranking_rules if column == "responses" else response_rules)(limits, conversational)
    return rules


def _value_check(name: str, rule: ValueRule) -> pa.Check:
    return pa.Check(lambda value: rule(value) is None, element_wise=True, name=name)


def _comparable(frame: pd.DataFrame) -> pd.Series:
    # Rows where chosen or rejected is missing or of a wrong type are `required` / `type` failures, not these.
    def ok(v: Any) -> bool:
        return isinstance(v, str | list)

    return frame["chosen"].map(ok) & frame["rejected"].map(ok)


def _distinct_pair(frame: pd.DataFrame) -> pd.Series:
    # Whitespace around a string does not make two answers different.
    def norm(v: Any) -> str:
        return canonical_json(v.strip() if isinstance(v, str) else v)

    return ~_comparable(frame) | (frame["chosen"].map(norm) != frame["rejected"].map(norm))


def _same_format(frame: pd.DataFrame) -> pd.Series:
    same = frame["chosen"].map(lambda v: isinstance(v, str)) == frame["rejected"].map(lambda v: isinstance(v, str))
    return ~_comparable(frame) | same


def _not_duplicated(frame: pd.DataFrame) -> pd.Series:
    return ~_row_keys(frame).duplicated(keep="first")


def _row_keys(frame: pd.DataFrame) -> pd.Series:
    return pd.Series([canonical_json(_present(r)) for r in frame.to_dict("records")], index=frame.index)


def _present(record: Mapping[str, Any]) -> dict[str, Any]:
    """A DataFrame record without the NaN cells pandas adds for keys a row does not have."""
    return {k: v for k, v in record.items() if not (isinstance(v, float) and v != v)}


def schema_for(
    kind: str,
    *,
    conversational: bool | None = None,
    limits: DataLimits | None = None,
    allow_extra_columns: bool = False,
) -> pa.DataFrameSchema:
    """The pandera schema of `kind` rows (one row per DataFrame row, cells holding strings or message lists)."""
    limits = limits or DataLimits()
    columns = {
        name: pa.Column(
            None,
            nullable=False,
            required=True,
            checks=[_value_check(rule_name, rule) for rule_name, rule in rules.items()],
        )
        for name, rules in column_rules(kind, limits, conversational).items()
    }
    checks = [pa.Check(_not_duplicated, name="no_duplicate_rows")]
    if kind == "preference":
        checks = [
            pa.Check(_distinct_pair, name="chosen_differs_from_rejected"),
            pa.Check(_same_format, name="same_format"),
            *checks,
        ]
    return pa.DataFrameSchema(columns, checks=checks, strict=not allow_extra_columns, name=f"{kind}_rows")


def rows_frame(rows: Sequence[Mapping[str, Any]], row_numbers: Sequence[int]) -> pd.DataFrame:
    """Rows as an object-dtype DataFrame indexed by their row numbers (lists stay lists, no string inference)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return pd.DataFrame(
        [[row.get(c, float("nan")) for c in columns] for row in rows],
        index=pd.Index(list(row_numbers), dtype="int64"),
        columns=columns,
        dtype=object,
    )


class _Explainer:
    """Turns pandera's failure table back into precise `Failure`s (value and reason from our own rules)."""

    def __init__(
        self,
        frame: pd.DataFrame,
        kind: str,
        source: str,
        lines: Mapping[int, int],
        rules: dict[str, dict[str, ValueRule]],
    ) -> None:
        self.frame, self.kind, self.source, self.lines, self.rules = frame, kind, source, lines, rules

    def failure(self, row: int | None, column: str | None, rule: str, message: str, value: Any = None) -> Failure:
        shown = "" if value is None else truncate_value(value)
        line = None if row is None else self.lines.get(row)
        return Failure(self.source, row, line, column, rule, message, shown)

    def explain(self, check: str, column: Any, index: Any, failure_case: Any) -> list[Failure]:
        if check == "column_in_dataframe":
            return [self.failure(None, str(failure_case), "required", "column missing from every row")]
        if check == "column_in_schema":
            return self.unknown_column(str(failure_case))
        if index is None or index != index:  # no row: a check of the whole frame or column failed or could not run
            return self.source_failure(check, column, failure_case)
        row = int(index)
        if check == "not_nullable":
            return [self.failure(row, str(column), "required", "missing value")]
        if check in ROW_RULE_COLUMNS:
            return [self.row_failure(check, row)]
        rule = self.rules.get(str(column), {}).get(check)
        value = self.frame.at[row, column]
        reason = rule(value) if rule is not None else None
        return [self.failure(row, str(column), check, reason or check, value)]

    def source_failure(self, check: str, column: Any, failure_case: Any) -> list[Failure]:
        """A failure pandera gives no row for. A row rule that could not run because one of its columns is
        missing says nothing new (the missing column is reported); anything else is reported for the source."""
        missing = [c for c in COLUMNS[self.kind] if c not in self.frame.columns]
        if check in ROW_RULE_COLUMNS:
            if missing:
                return []
            column = ROW_RULE_COLUMNS[check]
        return [
            self.failure(
                None,
                None if column is None else str(column),
                check,
                f"failed for the source as a whole: {failure_case}",
            )
        ]

    @cached_property
    def row_keys(self) -> pd.Series:
        return _row_keys(self.frame)

    @cached_property
    def first_occurrence(self) -> dict[str, int]:
        first: dict[str, int] = {}
        for row, key in self.row_keys.items():
            first.setdefault(key, int(row))
        return first

    def unknown_column(self, column: str) -> list[Failure]:
        allowed = ", ".join(COLUMNS[self.kind])
        message = f"unknown column (a {self.kind} row has: {allowed}; allow_extra_columns=True keeps it)"
        present = self.frame[column].map(lambda v: not (isinstance(v, float) and v != v))
        return [
            self.failure(int(row), column, "unknown_column", message, self.frame.at[row, column])
            for row in self.frame.index[present.to_numpy(dtype=bool)]
        ]

    def row_failure(self, check: str, row: int) -> Failure:
        column = ROW_RULE_COLUMNS[check]
        if check == "chosen_differs_from_rejected":
            return self.failure(
                row, column, check, "chosen and rejected are the same response", self.frame.at[row, "chosen"]
            )
        if check == "same_format":
            return self.failure(
                row,
                column,
                check,
                "chosen and rejected must both be strings or both messages",
                {"chosen": self.frame.at[row, "chosen"], "rejected": self.frame.at[row, "rejected"]},
            )
        first = self.first_occurrence[self.row_keys[row]]
        return self.failure(row, column, check, f"exact duplicate of row {first}", _present(self.frame.loc[row]))


def validate_rows(
    rows: Sequence[Mapping[str, Any]],
    kind: str,
    *,
    source: str = "<rows>",
    row_numbers: Sequence[int] | None = None,
    lines: Mapping[int, int] | None = None,
    limits: DataLimits | None = None,
    allow_extra_columns: bool = False,
    conversational: bool | None = None,
) -> list[Failure]:
    """Validate canonical `rows` of `kind` with pandera (lazy: every failure at once), most basic rule first.

    `row_numbers[i]` is the source row of `rows[i]` (default 1..n) and `lines` maps a row to its file line, so
    failures point at the user's file even after format conversion. Returns the failures sorted by row.
    """
    if not rows:
        return []
    limits = limits or DataLimits()
    frame = rows_frame(rows, row_numbers or range(1, len(rows) + 1))
    schema = schema_for(kind, conversational=conversational, limits=limits, allow_extra_columns=allow_extra_columns)
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        explainer = _Explainer(frame, kind, source, lines or {}, column_rules(kind, limits, conversational))
        cases = errors.failure_cases
        seen: set[tuple[Any, ...]] = set()
        failures: list[Failure] = []
        for case in cases.itertuples(index=False):
            column = None if case.check in ROW_RULE_COLUMNS else case.column
            key = (case.check, column, case.index, case.failure_case if case.index is None else None)
            if key in seen:  # a row-level check is reported once per column by pandera: keep one
                continue
            seen.add(key)
            failures += explainer.explain(str(case.check), case.column, case.index, case.failure_case)
        return sort_failures(failures, COLUMNS[kind])
    return []


def sort_failures(failures: Sequence[Failure], columns: Sequence[str] = ()) -> list[Failure]:
    """Whole-source failures first, then by row; within a row the kind's columns in order, then the rest."""

    def key(f: Failure) -> tuple[int, int]:
        position = columns.index(f.column) if f.column in columns else len(columns)
        return (-1 if f.row is None else f.row, position)

    return sorted(failures, key=key)
