"""Reading a source into raw records, each with its row number and (for line-based files) its line.

Sources: `.jsonl` / `.ndjson`, `.json` (an array of objects, or JSON lines under a `.json` name as
`Dataset.to_json` writes them), `.csv` (cells holding a JSON list, e.g. `responses` or messages, are decoded),
`.parquet`, a `datasets` `save_to_disk` directory, and anything else `datasets.load_dataset` understands (a hub
name, or a local directory of data files). Every problem — missing file, unsupported extension, empty file,
non-UTF-8 bytes, bad JSON lines (all of them, not just the first), a line longer than `MAX_LINE_BYTES` — is a
`DataValidationError`.

JSON lines are read one line at a time, and a line over `MAX_LINE_BYTES` is refused without being held whole,
so memory stays bounded by the cap (plus the rows kept) whatever the file holds: a 200 MB one-line file used to
take 1.35 GB before being refused.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from schemas.errors import DataValidationError, Failure, ValidationReport, source_error, truncate_value

LINE_SUFFIXES = (".jsonl", ".ndjson")
FILE_SUFFIXES = (*LINE_SUFFIXES, ".json", ".csv", ".parquet")
# Longest JSON line read. A valid row under the default `DataLimits` (16,000 characters a text, 16 responses a
# ranking, at most 6 bytes a character as JSON) is well under 2 MB; raise it with `read_source(max_line_bytes=)`.
MAX_LINE_BYTES = 16 << 20


@dataclass(frozen=True)
class Records:
    """Raw records of a source: `rows[i]` is row `i + 1`; `lines[i]` its first line in the file (or None)."""

    rows: list[dict[str, Any]]
    lines: list[int | None]
    source: str
    reader: str


def read_source(
    source: str | Path, kind: str, split: str | None = None, *, max_line_bytes: int | None = None
) -> Records:
    """Read every record of `source` (see module docstring); raises `DataValidationError`. JSON lines longer
    than `max_line_bytes` (default `MAX_LINE_BYTES`) are refused unread."""
    label = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        records = _read_dataset_dir(path, label, kind, split)
    elif path.suffix.lower() in FILE_SUFFIXES or path.is_file() or _looks_local(label):
        records = _read_file(path, label, kind, MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes)
    else:
        records = _read_hub(label, kind, split)
    if not records.rows:
        raise source_error(label, kind, "empty", "no rows: the source is empty")
    return records


def _looks_local(label: str) -> bool:
    return label.startswith((".", "/", "~")) or Path(label).suffix != ""


def _read_file(path: Path, label: str, kind: str, max_line_bytes: int) -> Records:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise source_error(label, kind, "file", "no such file")
    if suffix not in FILE_SUFFIXES:
        raise source_error(
            label,
            kind,
            "file",
            f"unsupported file extension {suffix or '(none)'!r} "
            f"(supported: {', '.join(FILE_SUFFIXES)}, or a dataset directory)",
        )
    if suffix == ".parquet":
        return _read_parquet(path, label, kind)
    if suffix in LINE_SUFFIXES:
        with open(path, "rb") as handle:
            return _read_jsonl(handle, label, kind, max_line_bytes)
    data = path.read_bytes()
    if not data.strip():
        raise source_error(label, kind, "empty", "empty file")
    text = _decode(data, label, kind)
    if suffix == ".csv":
        return _read_csv(text, label, kind)
    return _read_json(data, text, label, kind, max_line_bytes)


def _decode(data: bytes, label: str, kind: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a BOM some editors write is not part of the data
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise source_error(
            label,
            kind,
            "encoding",
            f"not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (line {line}); "
            "save the file as UTF-8",
            line=line,
        ) from None


def _lines(handle: BinaryIO, label: str, kind: str, max_line_bytes: int) -> Iterator[tuple[int, str | None]]:
    """`(line number, text)` of each line split at `\n`, decoded from UTF-8 (BOM dropped); text None for a line
    over `max_line_bytes`, which is skipped in chunks, never held whole."""
    offset = 0
    for number in itertools.count(1):
        raw = handle.readline(max_line_bytes + 1)
        if not raw:
            return
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            offset += len(raw)
            chunk_size = max(max_line_bytes, 1 << 16)  # memory in step with the cap; not byte by byte for tiny caps
            while (chunk := handle.readline(chunk_size)) and not chunk.endswith(b"\n"):
                offset += len(chunk)
            offset += len(chunk)
            yield number, None
            continue
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            bom = 3 if number == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            raise source_error(
                label,
                kind,
                "encoding",
                f"not valid UTF-8: byte 0x{raw[bom + exc.start]:02x} at byte offset "
                f"{offset + bom + exc.start} (line {number}); save the file as UTF-8",
                line=number,
            ) from None
        offset += len(raw)
        yield number, text.removesuffix("\n").removesuffix("\r")


def _read_jsonl(handle: BinaryIO, label: str, kind: str, max_line_bytes: int) -> Records:
    rows: list[dict[str, Any]] = []
    lines: list[int | None] = []
    failures: list[Failure] = []
    blank = True
    for number, line in _lines(handle, label, kind, max_line_bytes):
        if line is not None and not line.strip():
            continue
        blank = False
        row = len(rows) + len(failures) + 1
        if line is None:
            failures.append(
                Failure(
                    label,
                    row,
                    number,
                    None,
                    "line_size",
                    f"line longer than {max_line_bytes:,} bytes, the cap of one JSON line "
                    "(read_source's max_line_bytes): not read",
                )
            )
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            failures.append(
                Failure(
                    label,
                    row,
                    number,
                    None,
                    "json",
                    f"invalid JSON at column {exc.colno}: {exc.msg}",
                    truncate_value(line),
                )
            )
            continue
        if not isinstance(value, dict):
            failures.append(
                Failure(
                    label,
                    row,
                    number,
                    None,
                    "json",
                    f"expected a JSON object per line, got {type(value).__name__}",
                    truncate_value(value),
                )
            )
            continue
        rows.append(value)
        lines.append(number)
    if blank:
        raise source_error(label, kind, "empty", "empty file")
    if failures:
        raise DataValidationError(ValidationReport(label, kind, tuple(failures), num_rows=len(rows) + len(failures)))
    return Records(rows, lines, label, "jsonl")


def _read_json(data: bytes, text: str, label: str, kind: str, max_line_bytes: int) -> Records:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines saved as .json (what `Dataset.to_json` writes)
            return _read_jsonl(io.BytesIO(data), label, kind, max_line_bytes)
        raise source_error(
            label, kind, "json", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", line=exc.lineno
        ) from None
    if isinstance(value, dict):  # a single object is a one-line JSON lines file
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise source_error(label, kind, "json", "expected an array of JSON objects (or JSON lines)", value=value)
    return Records(value, [None] * len(value), label, "json")


def _maybe_json_list(cell: str | None) -> Any:
    """CSV cells are strings; one that holds a JSON list (a ranking, messages) is decoded."""
    if cell is None or not cell.lstrip().startswith("["):
        return cell
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return cell
    return value if isinstance(value, list) else cell


def _read_csv(text: str, label: str, kind: str) -> Records:
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\x00extra")
    rows: list[dict[str, Any]] = []
    lines: list[int | None] = []
    failures: list[Failure] = []
    start = 2  # line 1 is the header
    try:
        for record in reader:
            row = len(rows) + 1
            if "\x00extra" in record:
                failures.append(
                    Failure(
                        label,
                        row,
                        start,
                        None,
                        "csv",
                        "more fields than the header has columns",
                        truncate_value(record.pop("\x00extra")),
                    )
                )
            rows.append({k: _maybe_json_list(v) for k, v in record.items() if v is not None})
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise source_error(label, kind, "csv", f"malformed CSV: {exc}", line=reader.line_num) from None
    if failures:
        raise DataValidationError(ValidationReport(label, kind, tuple(failures), num_rows=len(rows)))
    return Records(rows, lines, label, "csv")


def _without_nulls(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Columnar formats fill a key a row lacks with None; treat it as absent, like a JSON row without the key.
    return [{k: v for k, v in row.items() if v is not None} for row in rows]


def _read_parquet(path: Path, label: str, kind: str) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise source_error(label, kind, "parquet", f"not a readable Parquet file: {exc}") from None
    return Records(_without_nulls(rows), [None] * len(rows), label, "parquet")


def _pick_split(dataset: Any, label: str, kind: str, split: str | None) -> Any:
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        return dataset
    names = list(dataset)
    chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if chosen not in names:
        raise source_error(label, kind, "split", f"split {chosen!r} not found; splits: {', '.join(names)}")
    return dataset[chosen]


def _read_dataset_dir(path: Path, label: str, kind: str, split: str | None) -> Records:
    import datasets

    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if not saved:  # a directory of data files: `load_dataset` infers the builder, as for a hub repository
        return _read_hub(label, kind, split)
    dataset = _pick_split(datasets.load_from_disk(str(path)), label, kind, split)
    return Records(_without_nulls(dataset.to_list()), [None] * len(dataset), label, "datasets")


def _read_hub(name: str, kind: str, split: str | None) -> Records:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - any loader failure is reported as bad data, with its message
        raise source_error(
            name, kind, "load_dataset", f"datasets.load_dataset failed: {type(exc).__name__}: {exc}"
        ) from None
    return Records(_without_nulls(dataset.to_list()), [None] * len(dataset), name, "datasets")
