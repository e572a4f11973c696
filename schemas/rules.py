"""The rules a single value must satisfy, each a function `value → None (ok) | reason`.

The pandera schemas (`schemas.models`) turn each rule into an element-wise check named after it, and the error
report calls the same function again to say *why* a value failed — one definition per rule.

A rule only judges what it is about: `not_blank` passes a value that is not a string or message list (that is
`type`'s failure), `roles` passes messages whose shape is already wrong (`message_format`'s failure), so one bad
value is reported once, by the most basic rule it breaks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataLimits:
    """Size limits, in characters (of a string, or summed over message contents)."""

    max_prompt_chars: int = 16_000
    """Longest prompt (all its messages together)."""
    max_response_chars: int = 16_000
    """Longest response / chosen / rejected / ranked response."""
    max_messages: int = 64
    """Most messages in one conversational prompt."""
    max_ranking_size: int = 16
    """Most responses in one ranking (a ranking of K gives K(K−1)/2 pairs)."""

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_response_chars", "max_messages", "max_ranking_size"):
            if getattr(self, name) < (2 if name == "max_ranking_size" else 1):
                raise ValueError(f"DataLimits.{name} must be positive (≥ 2 for a ranking), got {getattr(self, name)}")


Reason = str | None
ValueRule = Callable[[Any], Reason]


def is_message_list(value: Any) -> bool:
    """A list whose items all are `{"role": str, "content": str, ...}` dicts (the shape, not the roles)."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def content_chars(value: Any) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def type_rule(conversational: bool | None) -> ValueRule:
    """A string (`conversational=False`), a message list (`True`), or either (`None`)."""
    allowed = {None: (str, list), False: (str,), True: (list,)}[conversational]
    wanted = {None: "a string or a list of messages", False: "a string", True: "a list of messages"}[conversational]

    def rule(value: Any) -> Reason:
        return None if isinstance(value, allowed) else f"expected {wanted}, got {type(value).__name__}"

    return rule


def message_format(value: Any) -> Reason:
    if not isinstance(value, list):
        return None
    if not value:
        return "empty message list"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} is a {type(message).__name__}, expected a {{role, content}} object"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {i} has no string {key!r}"
    return None


def not_blank(value: Any) -> Reason:
    if isinstance(value, str):
        return "empty string" if not value else ("blank string (only whitespace)" if not value.strip() else None)
    if is_message_list(value):
        blank = [i for i, m in enumerate(value) if not m["content"].strip()]
        return f"message {blank[0]} has empty or blank content" if blank else None
    return None


def prompt_roles(value: Any) -> Reason:
    """[system], user, assistant, user, …, user: roles known, one optional leading system message, then user and
    assistant alternating, ending with the user turn the response answers."""
    if not is_message_list(value) or not value:
        return None
    roles = [m["role"] for m in value]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        return f"unknown role {unknown[0]!r} (allowed: {', '.join(ROLES)})"
    turns = roles[1:] if roles[0] == "system" else roles
    if "system" in turns:
        return f"'system' only as the first message, found at message {roles.index('system', 1)}"
    offset = len(roles) - len(turns)
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return f"roles must alternate user/assistant: message {i + offset} is {role!r}, expected {expected!r}"
    if not turns:
        return "a prompt needs a user message after the system message"
    if turns[-1] != "user":
        return "a prompt must end with a user message"
    return None


def response_roles(value: Any) -> Reason:
    """A conversational response is exactly one assistant message (the turn the model is trained to write)."""
    if not is_message_list(value) or not value:
        return None
    if len(value) != 1 or value[0]["role"] != "assistant":
        return f"expected exactly one assistant message, got roles {[m['role'] for m in value]}"
    return None


def max_chars(limit: int) -> ValueRule:
    def rule(value: Any) -> Reason:
        if not (isinstance(value, str) or is_message_list(value)):
            return None
        n = content_chars(value)
        return f"{n} characters, limit {limit}" if n > limit else None

    return rule


def max_messages(limit: int) -> ValueRule:
    def rule(value: Any) -> Reason:
        return f"{len(value)} messages, limit {limit}" if isinstance(value, list) and len(value) > limit else None

    return rule


def _first_failure(value: Any, rules: list[ValueRule]) -> Reason:
    return next((reason for rule in rules if (reason := rule(value)) is not None), None)


def response_rules(limits: DataLimits, conversational: bool | None) -> dict[str, ValueRule]:
    """The rules of one response value (response, chosen, rejected, an item of a ranking), by rule name."""
    return {
        "type": type_rule(conversational),
        "message_format": message_format,
        "not_blank": not_blank,
        "roles": response_roles,
        "max_length": max_chars(limits.max_response_chars),
    }


def prompt_rules(limits: DataLimits, conversational: bool | None) -> dict[str, ValueRule]:
    return {
        "type": type_rule(conversational),
        "message_format": message_format,
        "not_blank": not_blank,
        "roles": prompt_roles,
        "max_messages": max_messages(limits.max_messages),
        "max_length": max_chars(limits.max_prompt_chars),
    }


def ranking_rules(limits: DataLimits, conversational: bool | None) -> dict[str, ValueRule]:
    """`responses`: a list of K ∈ [2, max_ranking_size] valid, pairwise distinct responses, best first."""
    item_rules = list(response_rules(limits, conversational).values())

    def ranking_type(value: Any) -> Reason:
        return None if isinstance(value, list) else f"expected a list of responses, got {type(value).__name__}"

    def ranking_size(value: Any) -> Reason:
        if not isinstance(value, list) or 2 <= len(value) <= limits.max_ranking_size:
            return None
        return f"{len(value)} responses, a ranking needs 2 to {limits.max_ranking_size}"

    def ranked_items(value: Any) -> Reason:
        if not isinstance(value, list):
            return None
        for i, item in enumerate(value):
            if (reason := _first_failure(item, item_rules)) is not None:
                return f"response {i}: {reason}"
        return None

    def distinct(value: Any) -> Reason:
        if not isinstance(value, list):
            return None
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            key = repr(item)
            if key in seen:
                return f"responses {seen[key]} and {i} are identical"
            seen[key] = i
        return None

    return {
        "type": ranking_type,
        "ranking_size": ranking_size,
        "ranked_response": ranked_items,
        "distinct_responses": distinct,
    }
