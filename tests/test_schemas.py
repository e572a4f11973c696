"""Every validation rule, on real files: a bad row is rejected with its file, row, line, column, rule and value.

Each case writes a JSONL file whose rows are valid except one, loads it with `load_rows`, and checks the one
failure reported — and that the same file without the bad row is accepted (so the failure is caused by that row).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa
import pytest

from schemas import DataLimits, DataValidationError, Failure, load_rows, schema_for
from schemas.errors import code_block, code_span

USER = {"role": "user", "content": "My order #123456 is late."}
ASSISTANT = {"role": "assistant", "content": "I've reshipped order #123456 by express."}

GOOD: dict[str, list[dict[str, Any]]] = {
    "demonstration": [
        {"prompt": "Where is order #48213?", "response": "I've reshipped it; it arrives Friday."},
        {"prompt": [USER], "response": [ASSISTANT]},
    ],
    "preference": [
        {
            "prompt": "I was charged twice.",
            "chosen": "I've refunded the duplicate charge.",
            "rejected": "Not my problem.",
        },
        {
            "prompt": [{"role": "system", "content": "Be kind."}, USER],
            "chosen": [ASSISTANT],
            "rejected": [{"role": "assistant", "content": "Wait."}],
        },
    ],
    "ranking": [
        {"prompt": "My blender broke.", "responses": ["I've sent a replacement.", "Sorry.", "Go away."]},
        {"prompt": [USER], "responses": [[ASSISTANT], [{"role": "assistant", "content": "Wait."}]]},
    ],
    "prompt": [
        {"prompt": "My account C-4821 is locked."},
        {"prompt": [USER, ASSISTANT, {"role": "user", "content": "Still nothing."}]},
    ],
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def shown(value: Any) -> str:
    """A value as the report shows it: JSON, cut to 80 characters with an ellipsis."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:79] + "…"


def only_failure(path: Path, kind: str, **kwargs: Any) -> Failure:
    with pytest.raises(DataValidationError) as caught:
        load_rows(path, kind, **kwargs)
    failures = list(caught.value.report)
    assert len(failures) == 1, str(caught.value)
    assert str(failures[0]) in str(caught.value)  # the message lists the same failure the report holds
    return failures[0]


# (kind, the bad row, column, rule, start of the reason, the value as reported)
CASES = [
    ("preference", {"prompt": "Hi", "chosen": "Hello!"}, "rejected", "required", "missing value", ""),
    ("demonstration", {"prompt": 7, "response": "ok"}, "prompt", "type", "expected a string or a list", "7"),
    ("demonstration", {"prompt": "Help", "response": ""}, "response", "not_blank", "empty string", '""'),
    ("demonstration", {"prompt": "  \n\t", "response": "ok"}, "prompt", "not_blank", "blank string", '"  \\n\\t"'),
    (
        "demonstration",
        {"prompt": [{"role": "user", "content": " "}], "response": "ok"},
        "prompt",
        "not_blank",
        "message 0 has empty or blank content",
        '[{"role": "user", "content": " "}]',
    ),
    ("demonstration", {"prompt": [], "response": "ok"}, "prompt", "message_format", "empty message list", "[]"),
    (
        "demonstration",
        {"prompt": [{"role": "user"}], "response": "ok"},
        "prompt",
        "message_format",
        "message 0 has no string 'content'",
        '[{"role": "user"}]',
    ),
    (
        "demonstration",
        {"prompt": [{"role": "customer", "content": "hi"}], "response": "ok"},
        "prompt",
        "roles",
        "unknown role 'customer'",
        '[{"role": "customer", "content": "hi"}]',
    ),
    (
        "prompt",
        {"prompt": [USER, {"role": "user", "content": "hello?"}]},
        "prompt",
        "roles",
        "roles must alternate user/assistant: message 1 is 'user', expected 'assistant'",
        None,
    ),
    (
        "prompt",
        {"prompt": [USER, {"role": "system", "content": "x"}]},
        "prompt",
        "roles",
        "'system' only as the first message, found at message 1",
        None,
    ),
    ("prompt", {"prompt": [USER, ASSISTANT]}, "prompt", "roles", "a prompt must end with a user message", None),
    (
        "prompt",
        {"prompt": [{"role": "system", "content": "Be kind."}]},
        "prompt",
        "roles",
        "a prompt needs a user message after the system message",
        None,
    ),
    (
        "demonstration",
        {"prompt": [USER], "response": [ASSISTANT, ASSISTANT]},
        "response",
        "roles",
        "expected exactly one assistant message, got roles ['assistant', 'assistant']",
        None,
    ),
    (
        "demonstration",
        {"prompt": [USER], "response": [USER]},
        "response",
        "roles",
        "expected exactly one assistant message, got roles ['user']",
        None,
    ),
    (
        "preference",
        {"prompt": "Refund?", "chosen": "Same answer.", "rejected": " Same answer. "},
        "chosen, rejected",
        "chosen_differs_from_rejected",
        "chosen and rejected are the same response",
        '"Same answer."',
    ),
    (
        "preference",
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": "plain"},
        "chosen, rejected",
        "same_format",
        "chosen and rejected must both be strings or both messages",
        '{"chosen": [{"role": "assistant", "content": "I\'ve reshipped order #123456 by e…',
    ),
    (
        "ranking",
        {"prompt": "Late order", "responses": ["Only one"]},
        "responses",
        "ranking_size",
        "1 responses, a ranking needs 2 to 16",
        '["Only one"]',
    ),
    (
        "ranking",
        {"prompt": "Late order", "responses": "best, worst"},
        "responses",
        "type",
        "expected a list of responses, got str",
        '"best, worst"',
    ),
    (
        "ranking",
        {"prompt": "Late order", "responses": ["Good", "  "]},
        "responses",
        "ranked_response",
        "response 1: blank string (only whitespace)",
        '["Good", "  "]',
    ),
    (
        "ranking",
        {"prompt": "Late order", "responses": ["A", "B", "A"]},
        "responses",
        "distinct_responses",
        "responses 0 and 2 are identical",
        '["A", "B", "A"]',
    ),
]


@pytest.mark.parametrize(
    ("kind", "bad", "column", "rule", "reason", "value"), CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)]
)
def test_each_rule_rejects_its_violation_with_file_row_column_rule_and_value(
    tmp_path: Path, kind: str, bad: dict, column: str, rule: str, reason: str, value: str | None
) -> None:
    # Given valid rows of the kind, a blank line, and then the one bad row (row 3, line 4 of the file).
    good = GOOD[kind]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n\n" + json.dumps(bad) + "\n")

    # When it is loaded, then exactly that row is rejected, precisely.
    failure = only_failure(path, kind)
    assert (failure.source, failure.row, failure.line, failure.column, failure.rule) == (str(path), 3, 4, column, rule)
    assert failure.message.startswith(reason), failure.message
    assert failure.value == (value if value is not None else shown(bad[column.split(",")[0]]))
    # And without the bad row the file is accepted.
    assert load_rows(write_jsonl(tmp_path / "good.jsonl", good), kind).num_rows == 2


def test_duplicate_row_is_reported_against_its_first_occurrence(tmp_path: Path) -> None:
    rows = [*GOOD["preference"], GOOD["preference"][0]]
    failure = only_failure(write_jsonl(tmp_path / "dup.jsonl", rows), "preference")
    assert (failure.row, failure.line, failure.column, failure.rule) == (3, 3, "*", "no_duplicate_rows")
    assert failure.message == "exact duplicate of row 1"
    assert failure.value.startswith('{"prompt": "I was charged twice."')


def test_unknown_column_is_rejected_per_row_unless_allowed(tmp_path: Path) -> None:
    rows = [dict(GOOD["demonstration"][0], source="web"), GOOD["demonstration"][1]]
    path = write_jsonl(tmp_path / "extra.jsonl", rows)

    failure = only_failure(path, "demonstration")
    assert (failure.row, failure.column, failure.rule, failure.value) == (1, "source", "unknown_column", '"web"')
    assert "a demonstration row has: prompt, response" in failure.message

    kept = load_rows(path, "demonstration", allow_extra_columns=True)
    assert kept.rows[0] == {
        "prompt": "Where is order #48213?",
        "response": "I've reshipped it; it arrives Friday.",
        "source": "web",
    }


def test_a_column_missing_from_every_row_is_one_failure_about_the_whole_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts_only.jsonl", GOOD["prompt"])
    failure = only_failure(path, "demonstration")
    assert (failure.row, failure.line, failure.column, failure.rule) == (None, None, "response", "required")
    assert failure.message == "column missing from every row"


@pytest.mark.parametrize(
    ("limits", "row", "column", "rule", "reason"),
    [
        (
            DataLimits(max_response_chars=10),
            {"prompt": "Hi", "response": "eleven char"},
            "response",
            "max_length",
            "11 characters, limit 10",
        ),
        (
            DataLimits(max_prompt_chars=5),
            {
                "prompt": [{"role": "user", "content": "abc"}, ASSISTANT, {"role": "user", "content": "def"}],
                "response": "ok",
            },
            "prompt",
            "max_length",
            "46 characters, limit 5",
        ),  # 3 + 40 + 3
        (
            DataLimits(max_messages=2),
            {"prompt": [USER, ASSISTANT, USER], "response": "ok"},
            "prompt",
            "max_messages",
            "3 messages, limit 2",
        ),
    ],
)
def test_size_limits_are_configurable(
    tmp_path: Path, limits: DataLimits, row: dict, column: str, rule: str, reason: str
) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    assert load_rows(path, "demonstration").num_rows == 1  # within the default limits
    failure = only_failure(path, "demonstration", limits=limits)
    assert (failure.row, failure.column, failure.rule, failure.message) == (1, column, rule, reason)


def test_ranking_size_limit_is_configurable(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "k5.jsonl", [{"prompt": "Hi", "responses": ["a", "b", "c", "d", "e"]}])
    failure = only_failure(path, "ranking", limits=DataLimits(max_ranking_size=4))
    assert (failure.rule, failure.message) == ("ranking_size", "5 responses, a ranking needs 2 to 4")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_response_chars must be positive"):
        DataLimits(max_response_chars=0)
    with pytest.raises(ValueError, match="max_ranking_size"):
        DataLimits(max_ranking_size=1)


def test_conversational_and_plain_text_variants_accept_only_their_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", GOOD["demonstration"])  # row 1 plain text, row 2 messages
    assert load_rows(path, "demonstration").num_rows == 2

    with pytest.raises(DataValidationError) as chat:
        load_rows(path, "demonstration", conversational=True)
    assert [(f.row, f.column, f.rule) for f in chat.value.report] == [(1, "prompt", "type"), (1, "response", "type")]
    assert chat.value.report.failures[0].message == "expected a list of messages, got str"


def test_plain_variant_reports_both_columns_of_a_conversational_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", GOOD["demonstration"])
    with pytest.raises(DataValidationError) as plain:
        load_rows(path, "demonstration", conversational=False)
    assert [(f.row, f.column, f.rule, f.message) for f in plain.value.report] == [
        (2, "prompt", "type", "expected a string, got list"),
        (2, "response", "type", "expected a string, got list"),
    ]


def test_validation_is_lazy_every_failing_row_is_reported_at_once(tmp_path: Path) -> None:
    # Given a file with three bad rows among good ones.
    rows = [
        GOOD["preference"][0],
        {"prompt": "", "chosen": "a", "rejected": "b"},
        GOOD["preference"][1],
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "y", "chosen": "a", "rejected": "b", "rating": 5},
    ]
    path = write_jsonl(tmp_path / "three_bad.jsonl", rows)
    with pytest.raises(DataValidationError) as caught:
        load_rows(path, "preference")
    report = caught.value.report
    # Then one error carries all three, in row order, and its message names each row.
    assert [(f.row, f.rule) for f in report] == [
        (2, "not_blank"),
        (4, "chosen_differs_from_rejected"),
        (5, "unknown_column"),
    ]
    assert report.failing_rows == [2, 4, 5]
    message = str(caught.value)
    assert message.splitlines()[0] == f"{path}: invalid preference data: 3 failure(s) in 3 failing row(s) of 5:"
    for row in (2, 4, 5):
        assert f"{path}, row {row} (line {row})" in message


def test_long_values_are_truncated_to_80_characters(tmp_path: Path) -> None:
    long = "x" * 500
    failure = only_failure(
        write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Hi", "chosen": long, "rejected": long}]), "preference"
    )
    assert len(failure.value) == 80 and failure.value == '"' + "x" * 78 + "…"


def test_csv_rows_are_located_by_their_line_even_after_multiline_cells(tmp_path: Path) -> None:
    # Given a CSV whose first record spans three lines (a quoted multi-line cell).
    path = tmp_path / "demos.csv"
    path.write_text('prompt,response\n"Line one\nline two\nline three",ok\nHi,\n', encoding="utf-8")
    failure = only_failure(path, "demonstration")
    # Then the bad second record is row 2, starting on line 5 (line 1 is the header).
    assert (failure.row, failure.line, failure.column, failure.rule) == (2, 5, "response", "not_blank")


def test_report_is_written_as_markdown_and_json(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a|b", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataValidationError) as caught:
        load_rows(path, "preference")
    markdown = caught.value.write_report(tmp_path / "report" / "validation.md").read_text()
    as_json = json.loads(caught.value.write_report(tmp_path / "report" / "validation.json").read_text())

    assert markdown.startswith("# Data validation failed\n")
    assert (
        "| 1 | 1 | chosen, rejected | chosen_differs_from_rejected | chosen and rejected are the same response |"
        ' `"x"` |' in markdown
    )
    assert as_json["source"] == str(path) and as_json["kind"] == "preference" and as_json["num_rows"] == 1
    assert as_json["failures"] == [
        {
            "source": str(path),
            "row": 1,
            "line": 1,
            "column": "chosen, rejected",
            "rule": "chosen_differs_from_rejected",
            "message": "chosen and rejected are the same response",
            "value": '"x"',
        }
    ]


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("plain", "`plain`"),
        ("a ` b", "``a ` b``"),
        ("``x``", "``` ``x`` ```"),
        ("two\nlines\r\nthree", "`two lines three`"),
        (" padded ", "`  padded  `"),
    ],
)
def test_a_code_span_holds_any_text_on_one_line(text: str, span: str) -> None:
    """CommonMark: a code span's fence is longer than any backtick run inside; content that starts or ends with
    a backtick, or with a space at both ends, is padded by one space (which the renderer strips)."""
    assert code_span(text) == span


def test_a_code_block_fence_is_longer_than_any_backtick_run_inside() -> None:
    assert code_block("rlhf label tasks.jsonl") == "```\nrlhf label tasks.jsonl\n```"
    assert code_block("a ```` b") == "`````\na ```` b\n`````"


def test_report_values_with_backticks_stay_in_one_code_span_and_one_row(tmp_path: Path) -> None:
    """Given a value holding backticks and a pipe, and a column name holding a newline, then each failure is one
    row of the Markdown table, and the value is one code span (fenced by a longer backtick run) that contains
    it whole: it used to be wrapped in single backticks, which the first backtick inside closed."""
    value = "x `y` | ``z``"
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": value, "rejected": value, "a\nb": 1}])
    with pytest.raises(DataValidationError) as caught:
        load_rows(path, "preference")
    rows = [line for line in caught.value.report.to_markdown().splitlines() if line.startswith("| 1 |")]
    assert len(rows) == len(caught.value.failures) == 2
    [same] = [row for row in rows if "chosen_differs_from_rejected" in row]
    assert same.endswith(' | ```"x `y` \\| ``z``"``` |'), same
    [unknown] = [row for row in rows if "unknown_column" in row]
    assert unknown.startswith("| 1 | 1 | a b | unknown_column |") and unknown.endswith(" | `1` |")


def test_schemas_are_plain_pandera_schemas_usable_on_a_dataframe() -> None:
    schema = schema_for("preference", conversational=False)
    assert isinstance(schema, pa.DataFrameSchema) and list(schema.columns) == ["prompt", "chosen", "rejected"]
    good = pd.DataFrame([GOOD["preference"][0]], dtype=object)
    assert schema.validate(good) is not None
    bad = pd.DataFrame([{"prompt": "Hi", "chosen": "x", "rejected": "x"}], dtype=object)
    with pytest.raises(pa.errors.SchemaErrors) as caught:
        schema.validate(bad, lazy=True)
    assert set(caught.value.failure_cases["check"]) == {"chosen_differs_from_rejected"}


def test_unknown_kind_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data kind 'preferences'"):
        load_rows(write_jsonl(tmp_path / "p.jsonl", GOOD["preference"]), "preferences")
