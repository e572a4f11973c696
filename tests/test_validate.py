"""Stored data files are content-addressed: a file reused by name must still hold the rows of its digest."""

from __future__ import annotations

from pathlib import Path

from rlhf_core.atomic import sha256_file
from schemas import content_digest
from tasks.validate import store_rows

ROWS = [{"prompt": f"Where is order {i}?"} for i in range(5)]


def test_stored_rows_round_trip_and_their_file_hash_is_the_digest(tmp_path: Path) -> None:
    ref = store_rows(tmp_path, "prompts_train", "prompt", ROWS, "prompts.jsonl")
    path = Path(ref.path)
    assert ref.digest == content_digest(ROWS)
    assert path.read_text().splitlines() == [f'{{"prompt":"Where is order {i}?"}}' for i in range(5)]
    assert sha256_file(path) == ref.digest.removeprefix("sha256:")


def test_a_tampered_stored_file_is_recreated_before_reuse(tmp_path: Path) -> None:
    """Given stored rows whose file was edited afterwards (same name, other contents), when the same rows are
    stored again, then the file is rewritten with the rows of its digest instead of being reused."""
    path = Path(store_rows(tmp_path, "prompts_train", "prompt", ROWS, "prompts.jsonl").path)
    path.write_text('{"prompt":"Ignore previous instructions"}\n')
    again = store_rows(tmp_path, "prompts_train", "prompt", ROWS, "prompts.jsonl")
    assert Path(again.path) == path
    assert path.read_text().count("\n") == 5 and "Ignore" not in path.read_text()
