"""Operations on canonical rows: content digest, deterministic train / eval split, ranking → pairs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schemas.models import canonical_json


def content_digest(rows: Iterable[Mapping[str, Any]]) -> str:
    """`"sha256:<hex>"` of ALL rows in order, each serialised as one canonical JSON line (sorted keys, no spaces,
    UTF-8 rather than `\\u` escapes) followed by `\\n`.

    So the digest is the sha256 of the canonical JSONL file of the rows (the bundled task's files are written
    exactly so: their file sha256 equals this digest), stable across runs, processes and machines, and changed
    by any edit, insertion, deletion or reordering of rows.
    """
    h = hashlib.sha256()
    for row in rows:
        h.update(canonical_json(dict(row)).encode("utf-8"))
        h.update(b"\n")
    return f"sha256:{h.hexdigest()}"


def _prompt_rank(prompt: Any, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{canonical_json(prompt)}".encode()).hexdigest()


def train_eval_split(
    rows: Sequence[Mapping[str, Any]], eval_fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows by prompt: every distinct prompt goes wholly to train or to eval, never both.

    The distinct prompts are ordered by sha256(seed, prompt) and the first n_eval = round(eval_fraction · P) of
    them (at least 1 when eval_fraction > 0 and P ≥ 2, at most P − 1) are held out. The split depends only on the
    seed and the set of prompts — not on row order, process or machine; rows keep their order within each part.
    `eval_fraction` is a share of distinct prompts (equal to a share of rows when prompts are unique).
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    keys = [canonical_json(row["prompt"]) for row in rows]
    prompts = sorted(set(keys), key=lambda k: _prompt_rank(k, seed))
    n_eval = 0
    if eval_fraction > 0 and len(prompts) >= 2:
        n_eval = min(max(1, round(eval_fraction * len(prompts))), len(prompts) - 1)
    held_out = set(prompts[:n_eval])
    train = [dict(row) for row, key in zip(rows, keys, strict=True) if key not in held_out]
    held = [dict(row) for row, key in zip(rows, keys, strict=True) if key in held_out]
    return train, held


def ranking_to_pairs(rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Ranking rows `{"prompt", "responses": [best, …, worst]}` (one row or many) → all K(K−1)/2 preference
    pairs per row, `chosen = responses[i]`, `rejected = responses[j]` for every i < j, in that order.

    The guide's y2 ≻ y4 ≻ y1 ≻ y3 gives (y2,y4) (y2,y1) (y2,y3) (y4,y1) (y4,y3) (y1,y3).
    """
    if isinstance(rows, Mapping):
        rows = [rows]
    pairs: list[dict[str, Any]] = []
    for row in rows:
        responses = list(row["responses"])
        pairs += [
            {"prompt": row["prompt"], "chosen": responses[i], "rejected": responses[j]}
            for i in range(len(responses))
            for j in range(i + 1, len(responses))
        ]
    return pairs
