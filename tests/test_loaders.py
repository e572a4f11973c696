"""Loaders: every source type, the formats users bring (TRL, HH-RLHF, messages), malformed files, digests,
splits and ranking → pairs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import (
    DataValidationError,
    Failure,
    content_digest,
    load_rows,
    parse_hh_transcript,
    ranking_to_pairs,
    train_eval_split,
)

PREFS = [
    {"prompt": "Where is order #48213?", "chosen": "I've reshipped it by express.", "rejected": "No idea."},
    {"prompt": "I was charged twice.", "chosen": "I've refunded the duplicate.", "rejected": "Read the FAQ."},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def failures_of(source: Any, kind: str, **kwargs: Any) -> list[Failure]:
    with pytest.raises(DataValidationError) as caught:
        load_rows(source, kind, **kwargs)
    return list(caught.value.report)


# --------------------------------------------------------------------------------------------------------------
# Formats users already have
# --------------------------------------------------------------------------------------------------------------

HH_CHOSEN = (
    "\n\nHuman: My kettle arrived broken.\n\nAssistant: I'm sorry! Do you have the order number?"
    "\n\nHuman: It's #55120.\n\nAssistant: Thanks, I've sent a replacement for order #55120."
)
HH_REJECTED = (
    "\n\nHuman: My kettle arrived broken.\n\nAssistant: I'm sorry! Do you have the order number?"
    "\n\nHuman: It's #55120.\n\nAssistant: Kettles break."
)


def test_hh_rlhf_transcripts_split_into_shared_prompt_and_final_replies(tmp_path: Path) -> None:
    # Given Anthropic HH-RLHF rows: two whole transcripts that differ only in the final assistant reply.
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    loaded = load_rows(path, "preference")
    # Then the shared turns become the prompt (messages) and the replies become chosen / rejected.
    assert loaded.format == "hh-rlhf"
    assert loaded.rows == [
        {
            "prompt": [
                {"role": "user", "content": "My kettle arrived broken."},
                {"role": "assistant", "content": "I'm sorry! Do you have the order number?"},
                {"role": "user", "content": "It's #55120."},
            ],
            "chosen": [{"role": "assistant", "content": "Thanks, I've sent a replacement for order #55120."}],
            "rejected": [{"role": "assistant", "content": "Kettles break."}],
        }
    ]


def test_hh_rlhf_transcripts_without_a_shared_prefix_are_rejected_at_their_row(tmp_path: Path) -> None:
    other = "\n\nHuman: My kettle arrived late.\n\nAssistant: Sorry, I've expedited it."
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": HH_CHOSEN, "rejected": other},
        {"chosen": "Human said hi", "rejected": HH_REJECTED},
        {"chosen": HH_CHOSEN + "\n\nHuman: ok?", "rejected": HH_REJECTED},
    ]
    failures = failures_of(write_jsonl(tmp_path / "hh.jsonl", rows), "preference")
    assert [(f.row, f.line, f.column, f.rule) for f in failures] == [
        (2, 2, "chosen, rejected", "hh_rlhf_transcript"),
        (3, 3, "chosen", "hh_rlhf_transcript"),
        (4, 4, "chosen", "hh_rlhf_transcript"),
    ]
    assert failures[0].message == (
        "chosen and rejected do not share a prompt: they differ at turn 0, before their "
        "final assistant replies (hh-rlhf format)"
    )
    assert failures[1].message.startswith('not an HH-RLHF transcript: expected "\\n\\nHuman: …')
    assert failures[1].value == '"Human said hi"'
    assert failures[2].message == "the conversation must end with an assistant reply (hh-rlhf format)"


def test_parse_hh_transcript_tolerates_a_missing_leading_blank_line() -> None:
    assert parse_hh_transcript("Human: hi\n\nAssistant: hello") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


def test_trl_standard_and_conversational_prompt_completion_become_demonstrations(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Where is my order?", "completion": "Let me check order #48213."},
        {
            "prompt": [{"role": "user", "content": "Refund please"}],
            "completion": [{"role": "assistant", "content": "I've refunded $20.00."}],
        },
    ]
    loaded = load_rows(write_jsonl(tmp_path / "sft.jsonl", rows), "demonstration")
    assert loaded.format == "trl"
    assert loaded.rows == [
        {"prompt": "Where is my order?", "response": "Let me check order #48213."},
        {
            "prompt": [{"role": "user", "content": "Refund please"}],
            "response": [{"role": "assistant", "content": "I've refunded $20.00."}],
        },
    ]


def test_trl_preference_formats_explicit_and_implicit_prompt(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Cancel my plan."}
    explicit = write_jsonl(
        tmp_path / "explicit.jsonl",
        [
            {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": "Done, cancelled."}],
                "rejected": [{"role": "assistant", "content": "No."}],
            }
        ],
    )
    implicit = write_jsonl(
        tmp_path / "implicit.jsonl",
        [
            {
                "chosen": [user, {"role": "assistant", "content": "Done, cancelled."}],
                "rejected": [user, {"role": "assistant", "content": "No."}],
            }
        ],
    )
    a, b = load_rows(explicit, "preference"), load_rows(implicit, "preference")
    assert (a.format, b.format) == ("canonical", "trl")
    assert a.rows == b.rows and a.digest == b.digest


def test_openai_messages_become_demonstrations_and_prompts(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is #48213?"},
        {"role": "assistant", "content": "Shipped today."},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    demo = load_rows(path, "demonstration")
    assert demo.format == "messages"
    assert demo.rows == [{"prompt": messages[:2], "response": [messages[2]]}]
    assert load_rows(path, "prompt").rows == [{"prompt": messages[:2]}]

    bad = write_jsonl(tmp_path / "no_reply.jsonl", [{"messages": messages[:2]}])
    [failure] = failures_of(bad, "demonstration")
    assert (failure.row, failure.column, failure.rule) == (1, "messages", "messages_format")
    assert failure.message == "the last message must be the assistant's reply (messages format)"


def test_format_hint_overrides_detection_and_unknown_hints_are_reported(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    assert load_rows(path, "preference", format="trl").rows == PREFS
    [failure] = failures_of(path, "preference", format="alpaca")
    assert (failure.row, failure.rule) == (None, "format") and "unknown format 'alpaca'" in failure.message
    [failure] = failures_of(path, "ranking", format="hh-rlhf")
    assert (
        failure.message == "format 'hh-rlhf' does not apply to ranking rows (formats: canonical, trl, hh-rlhf, "
        "messages)"
    )


# --------------------------------------------------------------------------------------------------------------
# Source types
# --------------------------------------------------------------------------------------------------------------


def test_json_array_json_lines_csv_and_parquet_give_the_same_rows(tmp_path: Path) -> None:
    rankings = [
        {"prompt": "Late order #48213", "responses": ["I've reshipped it.", "Sorry.", "Go away."]},
        {"prompt": "Refund?", "responses": ["Refunded $12.50.", "No."]},
    ]
    jsonl = write_jsonl(tmp_path / "r.jsonl", rankings)
    array = tmp_path / "r.json"
    array.write_text(json.dumps(rankings))
    lines_as_json = write_jsonl(tmp_path / "lines.json", rankings)  # what Dataset.to_json writes
    csv_path = tmp_path / "r.csv"
    csv_path.write_text(
        "prompt,responses\n"
        + "".join(f'"{r["prompt"]}","{json.dumps(r["responses"]).replace(chr(34), chr(34) * 2)}"\n' for r in rankings)
    )
    parquet = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rankings), parquet)

    digests = {load_rows(p, "ranking").digest for p in (jsonl, array, lines_as_json, csv_path, parquet)}
    assert digests == {content_digest(rankings)}


def test_saved_dataset_directories_and_splits(tmp_path: Path) -> None:
    train, test = datasets.Dataset.from_list(PREFS), datasets.Dataset.from_list(PREFS[:1])
    train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))

    assert load_rows(tmp_path / "single", "preference").rows == PREFS
    assert load_rows(tmp_path / "dict", "preference").rows == PREFS  # `train` by default
    assert load_rows(tmp_path / "dict", "preference", split="test").rows == PREFS[:1]
    [failure] = failures_of(tmp_path / "dict", "preference", split="validation")
    assert (failure.rule, failure.message) == ("split", "split 'validation' not found; splits: train, test")


def test_load_dataset_path_with_a_local_data_files_directory(tmp_path: Path) -> None:
    # Given a directory of data files (what a hub repository looks like), loaded through `datasets.load_dataset`.
    folder = tmp_path / "repo"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PREFS)
    loaded = load_rows(folder, "preference")
    assert loaded.rows == PREFS and loaded.source == str(folder)


def test_rows_from_columnar_sources_treat_null_cells_as_missing(tmp_path: Path) -> None:
    parquet = tmp_path / "holes.parquet"
    pq.write_table(pa.Table.from_pylist([PREFS[0], {"prompt": "Hi", "chosen": "Hello!"}]), parquet)
    [failure] = failures_of(parquet, "preference")
    assert (failure.row, failure.line, failure.column, failure.rule) == (2, None, "rejected", "required")


# --------------------------------------------------------------------------------------------------------------
# Malformed files
# --------------------------------------------------------------------------------------------------------------


def test_every_bad_json_line_is_reported_with_its_line_and_the_parser_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(
        json.dumps(PREFS[0])
        + "\n{'prompt': 'single quotes'}\n\n"
        + json.dumps(PREFS[1])
        + '\n{"prompt": "cut off\n["a list"]\n'
    )
    failures = failures_of(path, "preference")
    assert [(f.row, f.line, f.rule) for f in failures] == [(2, 2, "json"), (4, 5, "json"), (5, 6, "json")]
    assert failures[0].message == "invalid JSON at column 2: Expecting property name enclosed in double quotes"
    assert failures[0].value == "\"{'prompt': 'single quotes'}\""
    assert failures[1].message.startswith("invalid JSON at column 12: Unterminated string")
    assert failures[2].message == "expected a JSON object per line, got list"


def test_non_utf8_file_names_the_byte_offset_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    first = (json.dumps(PREFS[0]) + "\n").encode()
    path.write_bytes(first + '{"prompt": "Où est ma commande?", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    [failure] = failures_of(path, "preference")
    offset = len(first) + len('{"prompt": "O')
    assert (failure.row, failure.line, failure.rule) == (None, 2, "encoding")
    assert failure.message == f"not valid UTF-8: byte 0xf9 at byte offset {offset} (line 2); save the file as UTF-8"


def test_a_jsonl_line_over_the_cap_is_refused_without_being_read_whole(tmp_path: Path, monkeypatch) -> None:
    """Given a JSONL file whose second line is 8 MiB and a per-line cap of 64 KiB, then that line is refused
    naming file, line and cap, the lines after it are still read and checked, and the peak of memory allocated
    while reading stays within a few caps: the long line is never held whole (it used to be read, decoded and
    split whole: 1.35 GB for a 200 MB line)."""
    import tracemalloc

    import schemas.readers

    cap = 64 << 10
    path = tmp_path / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(PREFS[0]) + "\n")
        handle.write('{"prompt": "' + "x" * (8 << 20) + '", "chosen": "a", "rejected": "b"}\n')
        handle.write(json.dumps(PREFS[1]) + "\n{not json}\n")
    monkeypatch.setattr(schemas.readers, "MAX_LINE_BYTES", cap)
    failures_of(tmp_path / "missing.jsonl", "preference")  # imports and caches warmed before measuring
    tracemalloc.start()
    try:
        failures = failures_of(path, "preference")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(f.row, f.line, f.rule) for f in failures] == [(2, 2, "line_size"), (4, 4, "json")]
    assert str(failures[0]).startswith(f"{path}, row 2 (line 2): [line_size] line longer than 65,536 bytes")
    assert peak < 16 * cap, f"peak {peak:,} bytes while reading a file of {path.stat().st_size:,}"
    # The cap is also a parameter of `read_source`; lines within it read as before.
    ok = write_jsonl(tmp_path / "ok.jsonl", PREFS)
    records = schemas.readers.read_source(ok, "preference", max_line_bytes=200)
    assert records.rows == PREFS and records.lines == [1, 2]
    with pytest.raises(DataValidationError, match="line longer than 10 bytes"):
        schemas.readers.read_source(ok, "preference", max_line_bytes=10)


@pytest.mark.parametrize(
    ("name", "content", "rule", "message"),
    [
        ("empty.jsonl", "", "empty", "empty file"),
        ("blank.jsonl", "\n  \n", "empty", "empty file"),
        ("empty.json", "[]", "empty", "no rows: the source is empty"),
        ("header_only.csv", "prompt,chosen,rejected\n", "empty", "no rows: the source is empty"),
        (
            "data.txt",
            "hello",
            "file",
            "unsupported file extension '.txt' (supported: .jsonl, .ndjson, .json, .csv, "
            ".parquet, or a dataset directory)",
        ),
        ("bad.json", '{"prompt": ', "json", "invalid JSON at line 1, column 12: Expecting value"),
        ("scalars.json", "[1, 2]", "json", "expected an array of JSON objects (or JSON lines)"),
        ("bad.parquet", "not parquet", "parquet", "not a readable Parquet file"),
    ],
)
def test_malformed_files_raise_the_same_error_type(
    tmp_path: Path, name: str, content: str, rule: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    [failure] = failures_of(path, "preference")
    assert (failure.source, failure.row, failure.rule) == (str(path), None, rule)
    assert failure.message.startswith(message), failure.message


def test_missing_file_is_a_data_validation_error(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError) as caught:
        load_rows(tmp_path / "nope.jsonl", "prompt")
    assert str(caught.value) == (
        f"{tmp_path / 'nope.jsonl'}: invalid prompt data: 1 failure(s) in the source as a "
        f"whole:\n  {tmp_path / 'nope.jsonl'}: [file] no such file"
    )


def test_csv_row_with_more_fields_than_the_header(tmp_path: Path) -> None:
    path = tmp_path / "extra.csv"
    path.write_text("prompt\nHi\nHello,surprise\n")
    [failure] = failures_of(path, "prompt")
    assert (failure.row, failure.line, failure.rule, failure.value) == (2, 3, "csv", '["surprise"]')


# --------------------------------------------------------------------------------------------------------------
# Digest
# --------------------------------------------------------------------------------------------------------------


def test_digest_is_sha256_of_the_canonical_json_lines_of_all_rows() -> None:
    import hashlib

    rows = [{"prompt": "Où?", "response": "Ici."}, {"response": "b", "prompt": "a"}]
    text = '{"prompt":"Où?","response":"Ici."}\n{"prompt":"a","response":"b"}\n'
    assert content_digest(rows) == "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_digest_is_stable_across_processes_and_key_order() -> None:
    code = "import json, sys; from schemas import content_digest; print(content_digest(json.loads(sys.stdin.read())))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(PREFS),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
        cwd=Path(__file__).parents[1],
    )
    assert other.stdout.strip() == content_digest(PREFS)
    assert content_digest([dict(reversed(list(r.items()))) for r in PREFS]) == content_digest(PREFS)


@pytest.mark.parametrize(
    "change", ["edit one character", "reorder", "drop a row", "add a row", "add a key", "string to messages"]
)
def test_digest_changes_with_any_change_to_any_row(change: str) -> None:
    rows = [dict(r) for r in PREFS] * 1 + [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(50)]
    before = content_digest(rows)
    changed = [dict(r) for r in rows]
    if change == "edit one character":
        changed[37]["chosen"] = "A"  # a row in the middle: the digest covers every row, not a sample
    elif change == "reorder":
        changed[10], changed[11] = changed[11], changed[10]
    elif change == "drop a row":
        del changed[-1]
    elif change == "add a row":
        changed.append(dict(changed[0], prompt="new"))
    elif change == "add a key":
        changed[5]["source"] = "web"
    else:
        changed[0]["prompt"] = [{"role": "user", "content": changed[0]["prompt"]}]
    assert content_digest(changed) != before


# --------------------------------------------------------------------------------------------------------------
# Train / eval split
# --------------------------------------------------------------------------------------------------------------

SPLIT_ROWS = [{"prompt": f"prompt {i % 40}", "response": f"reply {i}"} for i in range(100)]  # 40 prompts


def test_split_is_deterministic_by_seed_and_never_shares_a_prompt() -> None:
    train, held = train_eval_split(SPLIT_ROWS, 0.25, seed=7)
    assert (train, held) == train_eval_split(SPLIT_ROWS, 0.25, seed=7)
    assert {r["prompt"] for r in held} & {r["prompt"] for r in train} == set()
    assert len({r["prompt"] for r in held}) == 10  # round(0.25 · 40) prompts held out, with all their rows
    assert len(train) + len(held) == 100
    assert train == [r for r in SPLIT_ROWS if r not in held]  # rows keep their order
    assert train_eval_split(SPLIT_ROWS, 0.25, seed=8)[1] != held


def test_split_does_not_depend_on_row_order() -> None:
    held = train_eval_split(SPLIT_ROWS, 0.2, seed=3)[1]
    reversed_held = train_eval_split(SPLIT_ROWS[::-1], 0.2, seed=3)[1]
    assert sorted(map(json.dumps, held)) == sorted(map(json.dumps, reversed_held))


def test_split_edge_cases() -> None:
    assert train_eval_split(SPLIT_ROWS, 0.0, seed=0) == ([dict(r) for r in SPLIT_ROWS], [])
    few = SPLIT_ROWS[:3]
    assert len(train_eval_split(few, 0.01, seed=0)[1]) == 1  # at least one held-out prompt when asked for any
    assert len(train_eval_split(few, 0.99, seed=0)[0]) == 1  # and at least one left to train on
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(SPLIT_ROWS, 1.0, seed=0)


# --------------------------------------------------------------------------------------------------------------
# Ranking → pairs
# --------------------------------------------------------------------------------------------------------------


def test_ranking_expands_to_all_ordered_pairs_the_guides_example() -> None:
    # The guide's ranking y2 ≻ y4 ≻ y1 ≻ y3: K = 4 gives K(K−1)/2 = 6 pairs, each better one chosen.
    pairs = ranking_to_pairs({"prompt": "x", "responses": ["y2", "y4", "y1", "y3"]})
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("y2", "y4"),
        ("y2", "y1"),
        ("y2", "y3"),
        ("y4", "y1"),
        ("y4", "y3"),
        ("y1", "y3"),
    ]
    assert all(p["prompt"] == "x" for p in pairs)


def test_ranking_to_pairs_over_many_rows_and_loaded_pairs_validate(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "responses": ["1", "2"]}, {"prompt": "b", "responses": ["1", "2", "3", "4", "5"]}]
    pairs = ranking_to_pairs(rows)
    assert len(pairs) == 1 + 10
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert load_rows(path, "preference").num_rows == 11


def test_converted_conversations_render_through_the_chat_template(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Given HH-RLHF rows converted by the loader, when rendered by `rlhf_core.tokenization` with the tiny
    tokenizer's ChatML template, then the prompt is every shared turn followed by the assistant header, and the
    response is the final reply closed by the end-of-turn token."""
    from rlhf_core.tokenization import encode_prompt_response, render_prompt, render_response

    row = load_rows(
        write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]), "preference"
    ).rows[0]
    assert render_prompt(tiny_tokenizer, row["prompt"]) == (
        "<|im_start|>user\nMy kettle arrived broken.<|im_end|>\n"
        "<|im_start|>assistant\nI'm sorry! Do you have the order number?<|im_end|>\n"
        "<|im_start|>user\nIt's #55120.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_response(tiny_tokenizer, row["rejected"]) == "Kettles break.<|im_end|>"
    pair = encode_prompt_response(tiny_tokenizer, row["prompt"], row["chosen"])
    assert pair.response_ids[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
