"""The formats users already have, converted to canonical rows (docs/architecture.md).

| format | recognised by (columns) | becomes |
| --- | --- | --- |
| `canonical` | the kind's own columns (also TRL's explicit-prompt formats, standard or conversational) | as is |
| `trl` | SFT `prompt` + `completion`; preference `chosen` + `rejected` message lists, no `prompt` (TRL's implicit prompt) | `response`; shared prefix → `prompt` |
| `hh-rlhf` | `chosen` + `rejected` strings holding whole "\\n\\nHuman: … \\n\\nAssistant: …" transcripts | prompt = shared turns (messages), chosen / rejected = the differing final assistant reply |
| `messages` | an OpenAI-style `messages` list | demonstration: prompt = all but the last (assistant) message; prompt-only: up to the last user message |

Conversion is per row and never drops a row silently: a row that cannot be converted becomes a `RowProblem`
(reported like a schema failure, at the original row). Columns a format does not use pass through untouched, so
the schema's unknown-column rule still sees them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

FORMATS = ("canonical", "trl", "hh-rlhf", "messages")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

Row = dict[str, Any]


class RowProblem(Exception):
    """A row that does not fit its format: which `column`, which `rule`, why."""

    def __init__(self, column: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.column, self.rule, self.message = column, rule, message


def detect_format(kind: str, columns: Iterable[str], rows: list[Mapping[str, Any]]) -> str:
    """The format of rows of `kind` with these `columns` (the union over all rows)."""
    cols = set(columns)
    if kind == "demonstration" and "response" not in cols:
        if {"prompt", "completion"} <= cols:
            return "trl"
        if "messages" in cols:
            return "messages"
    if kind == "preference" and "prompt" not in cols and {"chosen", "rejected"} <= cols:
        first = next((r["chosen"] for r in rows if "chosen" in r), None)
        return "hh-rlhf" if isinstance(first, str) else "trl"
    if kind == "prompt" and "prompt" not in cols and "messages" in cols:
        return "messages"
    return "canonical"


def _require(row: Mapping[str, Any], column: str, kind: type) -> Any:
    value = row.get(column)
    if value is None:
        raise RowProblem(column, "required", "missing value")
    if not isinstance(value, kind):
        raise RowProblem(
            column, "type", f"expected {'a string' if kind is str else 'a list'}, got {type(value).__name__}"
        )
    return value


def _messages(value: list, column: str) -> list[dict[str, Any]]:
    if not all(isinstance(m, dict) and "role" in m for m in value):
        raise RowProblem(column, "message_format", "every message must be a {role, content} object")
    return value


def parse_hh_transcript(text: str, column: str = "chosen") -> list[dict[str, str]]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" → [{user: a}, {assistant: b}] (contents stripped of surrounding space)."""
    # Some copies drop the blank line before the very first turn.
    parts = _HH_TURN.split("\n\n" + text if text.startswith("Human:") else text)
    if parts[0].strip() or len(parts) < 3:
        raise RowProblem(
            column, "hh_rlhf_transcript", 'not an HH-RLHF transcript: expected "\\n\\nHuman: …\\n\\nAssistant: …" turns'
        )
    return [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def split_shared_prefix(
    chosen: list[dict[str, Any]], rejected: list[dict[str, Any]], rule: str
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Two whole conversations → (shared prompt, final chosen reply, final rejected reply).

    Both must end with an assistant turn and agree on every turn before it; the prompt is those turns."""
    for column, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation or conversation[-1].get("role") != "assistant":
            raise RowProblem(column, rule, "the conversation must end with an assistant reply")
    prompt, prompt_rejected = chosen[:-1], rejected[:-1]
    if prompt != prompt_rejected:
        turn = next(
            (i for i, (a, b) in enumerate(zip(prompt, prompt_rejected, strict=False)) if a != b),
            min(len(prompt), len(prompt_rejected)),
        )
        raise RowProblem(
            "chosen, rejected",
            rule,
            f"chosen and rejected do not share a prompt: they differ at "
            f"turn {turn}, before their final assistant replies",
        )
    if not prompt:
        raise RowProblem("chosen, rejected", rule, "no prompt: the conversations hold only the assistant reply")
    return prompt, chosen[-1], rejected[-1]


def _rest(row: Mapping[str, Any], *used: str) -> Row:
    return {k: v for k, v in row.items() if k not in used}


def from_hh(row: Mapping[str, Any]) -> Row:
    chosen = parse_hh_transcript(_require(row, "chosen", str), "chosen")
    rejected = parse_hh_transcript(_require(row, "rejected", str), "rejected")
    prompt, best, worst = split_shared_prefix(chosen, rejected, "hh_rlhf_transcript")
    return {"prompt": prompt, "chosen": [best], "rejected": [worst], **_rest(row, "chosen", "rejected")}


def from_trl_preference(row: Mapping[str, Any]) -> Row:
    chosen = _messages(_require(row, "chosen", list), "chosen")
    rejected = _messages(_require(row, "rejected", list), "rejected")
    prompt, best, worst = split_shared_prefix(chosen, rejected, "implicit_prompt")
    return {"prompt": prompt, "chosen": [best], "rejected": [worst], **_rest(row, "chosen", "rejected")}


def from_trl_completion(row: Mapping[str, Any]) -> Row:
    return {"response": row.get("completion"), **_rest(row, "completion")}


def from_messages(row: Mapping[str, Any], kind: str) -> Row:
    messages = _messages(_require(row, "messages", list), "messages")
    if kind == "prompt":
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise RowProblem("messages", "messages_format", "no user message to use as the prompt")
        return {"prompt": messages[: last_user + 1], **_rest(row, "messages")}
    if not messages or messages[-1]["role"] != "assistant":
        raise RowProblem("messages", "messages_format", "the last message must be the assistant's reply")
    return {"prompt": messages[:-1], "response": [messages[-1]], **_rest(row, "messages")}


def converter(kind: str, fmt: str) -> Callable[[Mapping[str, Any]], Row]:
    """The row → canonical-row function of format `fmt` for rows of `kind`."""
    if fmt == "hh-rlhf" and kind == "preference":
        return from_hh
    if fmt == "trl" and kind == "preference":
        return lambda row: from_trl_preference(row) if "prompt" not in row else dict(row)
    if fmt == "trl" and kind == "demonstration":
        return lambda row: from_trl_completion(row) if "completion" in row else dict(row)
    if fmt == "messages" and kind in ("demonstration", "prompt"):
        return lambda row: from_messages(row, kind)
    if fmt in ("canonical", "trl"):
        return dict
    raise ValueError(f"format {fmt!r} does not apply to {kind} rows (formats: {', '.join(FORMATS)})")
