"""Token-length limits from the data, and the guard against limits that cut the data.

Why: a response cut by `max_response_len` loses its end-of-turn token, so SFT never teaches the model to stop;
a sampling limit (`max_new_tokens`) below the typical answer leaves most rollouts without EOS, and the no-EOS
penalty then replaces every PPO score by the same constant (docs/pitfalls.md, "Lengths"). So every length
setting accepts `"auto"`, the pipeline's default, and is resolved from token lengths measured on the data with
the base model's tokenizer — prompt rendered with the chat template, response followed by its end-of-turn token,
exactly as the trainers encode them (`rlhf_core.tokenization`).

    measure_lengths(tokenizer, rows, kind)        → {"prompt": LengthStats, "response": LengthStats}
    resolve_lengths(config, prompt=..., response=..., policy=LengthPolicy())
        "auto" training limits (max_prompt_len, max_response_len) → the `coverage` quantile (default 95%);
        "auto" sampling limits (max_new_tokens)                   → that quantile × `sampling_headroom`;
        an explicit limit that cuts more than 1 − coverage of the rows → `TruncationError` naming the numbers and
        the fix, unless `allow_truncation`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from rlhf_core.tokenization import encode_prompt, render_response

AUTO = "auto"
Auto = Literal["auto"]
PROMPT_FIELDS = ("max_prompt_len",)
RESPONSE_FIELDS = ("max_response_len",)
SAMPLING_FIELDS = ("max_new_tokens",)


class TruncationError(ValueError):
    """An explicit length limit cuts more of the data than the length policy allows."""


@dataclass(frozen=True)
class LengthPolicy:
    """How `auto` lengths are chosen and how much an explicit limit may cut (the pipeline's `lengths:`)."""

    coverage: float = 0.95
    """`auto` limits cover this share of the rows; an explicit limit must cover it too (else an error)."""
    sampling_headroom: float = 1.25
    """`auto` sampling limits (`max_new_tokens`) are the covered response length times this: a policy's answers
    vary more than the data's, and an answer cut by the limit gets the no-EOS penalty."""
    allow_truncation: bool = False
    """Accept explicit limits that cut more than 1 − `coverage` of the rows (you mean to truncate)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.sampling_headroom < 1.0:
            raise ValueError(f"sampling_headroom must be >= 1, got {self.sampling_headroom}")


@dataclass(frozen=True)
class LengthStats:
    """Token lengths of one field over a dataset, as a histogram `{length: rows}` (small, JSON-friendly, exact)."""

    histogram: Mapping[int, int]

    @classmethod
    def of(cls, lengths: Iterable[int]) -> LengthStats:
        return cls(dict(sorted(Counter(int(n) for n in lengths).items())))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LengthStats:
        return cls({int(k): int(v) for k, v in data["histogram"].items()})

    def to_json(self) -> dict[str, Any]:
        return {"histogram": {str(k): v for k, v in self.histogram.items()}, **self.summary()}

    @property
    def count(self) -> int:
        return sum(self.histogram.values())

    def quantile(self, q: float) -> int:
        """The smallest length L with at least a share `q` of the rows no longer than L (0 for no rows)."""
        need, seen = math.ceil(q * self.count - 1e-9), 0
        for length, rows in sorted(self.histogram.items()):
            seen += rows
            if seen >= need:
                return length
        return max(self.histogram, default=0)

    def share_longer_than(self, limit: int) -> float:
        """Share of rows a limit of `limit` tokens cuts."""
        cut = sum(rows for length, rows in self.histogram.items() if length > limit)
        return cut / self.count if self.count else 0.0

    def summary(self) -> dict[str, int]:
        """`count`, `p50`, `p95`, `max`: what is logged and shown."""
        return {
            "count": self.count,
            "p50": self.quantile(0.5),
            "p95": self.quantile(0.95),
            "max": max(self.histogram, default=0),
        }


def measure_lengths(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping[str, Any]], kind: str
) -> dict[str, LengthStats]:
    """Token lengths of a dataset's prompts and (for demonstration, preference and ranking rows) responses, as
    the trainers encode them: the prompt through the chat template, each response with its end-of-turn token."""
    response_keys = {
        "demonstration": ("response",),
        "preference": ("chosen", "rejected"),
        "ranking": ("responses",),
        "prompt": (),
    }[kind]
    prompts = [len(encode_prompt(tokenizer, row["prompt"])) for row in rows]
    out = {"prompt": LengthStats.of(prompts)}
    texts = []
    for row in rows:
        for key in response_keys:
            value = row[key]
            texts.extend(value if key == "responses" else [value])
    if response_keys:
        rendered = [render_response(tokenizer, t) for t in texts]
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else []
        out["response"] = LengthStats.of(len(x) for x in ids)
    return out


def merge_stats(*stats: LengthStats | None) -> LengthStats | None:
    """One histogram of several datasets (None when none is given)."""
    given = [s for s in stats if s is not None]
    if not given:
        return None
    total: Counter[int] = Counter()
    for s in given:
        total.update(s.histogram)
    return LengthStats(dict(sorted(total.items())))


def resolve_length(
    name: str, setting: Any, stats: LengthStats | None, policy: LengthPolicy, sampling: bool, where: str = ""
) -> Any:
    """One limit: `"auto"` → the covered length (× headroom when `sampling`); an explicit one is checked."""
    if setting == AUTO:
        if stats is None or stats.count == 0:
            raise ValueError(
                f"{where}{name}='auto' needs token lengths of the data to resolve from; set an integer instead"
            )
        covered = stats.quantile(policy.coverage)
        return max(1, math.ceil(covered * policy.sampling_headroom) if sampling else covered)
    if setting is None or stats is None or policy.allow_truncation:
        return setting
    cut = stats.share_longer_than(int(setting))
    if cut > 1.0 - policy.coverage + 1e-12:
        s = stats.summary()
        raise TruncationError(
            f"{where}{name}={setting} cuts {cut:.0%} of the rows (token lengths: p50 {s['p50']}, p95 {s['p95']}, "
            f"max {s['max']}, over {s['count']} rows); a cut response loses its end-of-turn token, so the model "
            f"never learns to stop. Set {name}: auto (covers {policy.coverage:.0%}) or >= "
            f"{stats.quantile(policy.coverage)}, or lengths.allow_truncation: true if you mean to cut."
        )
    return setting


def resolve_lengths(
    config: Any,
    prompt: LengthStats | None = None,
    response: LengthStats | None = None,
    policy: LengthPolicy | None = None,
    where: str = "",
) -> Any:
    """`config` (a dataclass) with every `"auto"` length field resolved and every explicit one checked, nested
    dataclasses (e.g. a `sampling` config) included; returns a copy. `where` prefixes error messages."""
    policy = policy or LengthPolicy()
    changes: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = resolve_lengths(value, prompt, response, policy, f"{where}{f.name}.")
        elif f.name in PROMPT_FIELDS:
            changes[f.name] = resolve_length(f.name, value, prompt, policy, False, where)
        elif f.name in RESPONSE_FIELDS or f.name in SAMPLING_FIELDS:
            changes[f.name] = resolve_length(f.name, value, response, policy, f.name in SAMPLING_FIELDS, where)
    return replace(config, **changes) if changes else config


def unresolved(config: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields still `"auto"` (nested dataclasses included)."""
    out = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            out += unresolved(value, f"{prefix}{f.name}.")
        elif value == AUTO:
            out.append(prefix + f.name)
    return out


def row_kind(rows: Sequence[Mapping[str, Any]]) -> str:
    """`demonstration`, `preference`, `ranking` or `prompt`, from the first row's keys."""
    first = rows[0] if rows else {}
    for key, kind in (("response", "demonstration"), ("chosen", "preference"), ("responses", "ranking")):
        if key in first:
            return kind
    return "prompt"


def resolve_from_rows(config: Any, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping[str, Any]]) -> Any:
    """A library trainer's `"auto"` lengths resolved from its own training rows (the default `LengthPolicy`).
    Explicit limits pass unchecked here: the pipeline checks them against the whole dataset before training."""
    if not unresolved(config):
        return config
    stats = measure_lengths(tokenizer, rows, row_kind(rows))
    return resolve_lengths(config, stats["prompt"], stats.get("response"), LengthPolicy(allow_truncation=True))
