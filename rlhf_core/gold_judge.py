"""The bundled support-bot task's gold judge: how good a reply is as an answer to a frustrated customer.

Independent of how the data was generated (`rlhf_core.support_bot`): VADER (Hutto & Gilbert 2014, a published
sentiment lexicon shipped with `vaderSentiment`) for tone, plus simple checks for being about this customer's
case, committing to an action, brevity and repetition. It labels the bundled data and scores evaluations; no stage
trains on it unless a user names it as a reward. Configs name it `rlhf_core.support_bot:gold_score` (re-exported).
"""

from __future__ import annotations

import re
from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

Message = dict[str, str]
Conversation = str | list[Message]

EMPTY_SCORE = -2.0
"""Score of an empty or blank reply (below any reply with words: compound ≥ −1, penalties ≤ 2)."""
LONG_REPLY_WORDS = 80
"""Replies longer than this many words lose `LENGTH_PENALTY` (support replies should be short)."""
LENGTH_PENALTY = 1.0
MIN_DISTINCT_RATIO = 0.5
"""A reply of ≥ 8 words whose distinct words are fewer than this share of its words is repetitive."""
REPETITION_PENALTY = 1.0

# Words that commit to a concrete action on the customer's behalf. A published lexicon would be better; this
# short list is deliberately generic (any support task), not tuned to the generator's sentences.
ACTION_WORDS = frozenset(
    {
        "arrange",
        "arranged",
        "cancel",
        "cancelled",
        "credit",
        "credited",
        "escalate",
        "escalated",
        "expedite",
        "expedited",
        "issue",
        "issued",
        "refund",
        "refunded",
        "reimburse",
        "reimbursed",
        "reactivate",
        "reactivated",
        "replace",
        "replaced",
        "replacement",
        "reship",
        "reshipped",
        "resend",
        "resent",
        "reset",
        "restore",
        "restored",
        "return",
        "reverse",
        "reversed",
        "send",
        "sending",
        "sent",
        "ship",
        "shipped",
        "track",
        "tracking",
        "unlock",
        "unlocked",
        "upgrade",
        "upgraded",
        "waive",
        "waived",
    }
)

_WORD = re.compile(r"[a-z0-9']+")
# Tokens made of digits (with inner `.,-`): order and customer numbers, amounts, `3-5`. Matched as whole tokens
# on both sides, so "3" never matches inside "#48213".
_ENTITY = re.compile(r"\d(?:[\d.,-]*\d)?")
MIN_ENTITY_CHARS = 3
"""Shorter numbers ("3 days", "the 2nd") are too common to show the reply is about this customer's case."""


@lru_cache(maxsize=1)
def _vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def text_of(x: Conversation) -> str:
    """A string as is; messages as their contents joined by newlines."""
    return x if isinstance(x, str) else "\n".join(m["content"] for m in x)


def entities(text: str) -> set[str]:
    """The concrete references in `text`: every number of ≥ `MIN_ENTITY_CHARS` characters (order and customer
    numbers, amounts; `#48213` → `48213`, `$23.45` → `23.45`, `C-4821` → `4821`)."""
    return {m.group(0) for m in _ENTITY.finditer(text) if len(m.group(0)) >= MIN_ENTITY_CHARS}


def gold_score(prompt: Conversation, response: Conversation) -> float:
    """The task's gold judge: how good `response` is as an answer to the customer's `prompt`.

        score = vader_compound(response)              ∈ [−1, 1]   tone (VADER, the published lexicon)
              + 1[response repeats a prompt entity]   ∈ {0, 1}    it is about *this* order / account
              + 1[response contains an action word]   ∈ {0, 1}    it commits to something (`ACTION_WORDS`)
              − 1[more than 80 words] − 1[≥ 8 words and distinct words < 50 %]

    An empty or blank reply scores `EMPTY_SCORE` (−2). Range otherwise [−3, 3]. Entities (see `entities`) are looked
    for in the whole prompt (all turns of a conversation). Deterministic and independent of how the data was generated;
    used for labelling the bundled data and for evaluation, never as a training reward.
    """
    text = text_of(response).strip()
    if not text:
        return EMPTY_SCORE
    words = _WORD.findall(text.lower())
    score = _vader().polarity_scores(text)["compound"]
    score += float(not entities(text_of(prompt)).isdisjoint(entities(text)))
    score += float(not ACTION_WORDS.isdisjoint(words))
    if len(words) > LONG_REPLY_WORDS:
        score -= LENGTH_PENALTY
    if len(words) >= 8 and len(set(words)) < MIN_DISTINCT_RATIO * len(words):
        score -= REPETITION_PENALTY
    return score
