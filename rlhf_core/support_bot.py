"""The bundled task: a customer-support assistant answering frustrated customers, plus its gold judge.

    python -m rlhf_core.support_bot --out data/support_bot --seed 0 [--scale N]

writes (rows in the canonical formats of docs/architecture.md, one JSON object per line):

| file | rows (scale 1) | row |
| --- | --- | --- |
| `demonstrations.jsonl` | 600 | `{"prompt", "response"}`: a good, empathetic and helpful reply |
| `demonstrations_chat.jsonl` | 32 | the same kind of row as messages (system + multi-turn), for the chat path |
| `preferences.jsonl` | 600 | `{"prompt", "chosen", "rejected"}` ordered by the gold judge, 10 % flipped |
| `rankings.jsonl` | 150 | `{"prompt", "responses"}`: 4 candidates best → worst by the judge, 10 % noisy |
| `prompts_train.jsonl` | 200 | `{"prompt"}`: PPO rollout prompts |
| `prompts_eval.jsonl` | 64 | `{"prompt"}`: held out, never a prompt of any other file |
| `manifest.json`, `README.md` | | counts, seed, flips and the sha256 of every file |

Prompts combine an issue (late order, wrong item, refund, double charge, broken product, missing part, account
lockout, subscription billing), a product, a customer name, order / customer numbers, amounts, dates and many
openers, complaints and demands, so two prompts rarely share more than their skeleton.

Candidate replies come in five styles (empathetic + helpful, helpful but curt, polite but vague, rude, off
topic), each with several phrasings. The *labels* do not come from the style: every candidate is scored by
`gold_score`, an independent judge built on VADER (Hutto & Gilbert 2014, a published sentiment lexicon shipped
with `vaderSentiment`) plus a simple helpfulness check, and pairs / rankings are ordered by that score. A
configurable share of them is then corrupted, as noisy human raters would:
a flipped preference pair swaps chosen and rejected; a noisy ranking has one random adjacent pair swapped.

Everything is drawn from one `random.Random(seed)` (its integer-seeded stream is stable across Python
versions) and written with sorted keys and fixed separators, so regeneration is byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf_core.gold_judge import Message, gold_score

# --------------------------------------------------------------------------------------------------------------
# Vocabulary of the generator
# --------------------------------------------------------------------------------------------------------------

NAMES = (
    "Maria",
    "James",
    "Aisha",
    "Chen",
    "Lucas",
    "Priya",
    "Tom",
    "Fatima",
    "Oliver",
    "Yuki",
    "Sofia",
    "Daniel",
    "Amara",
    "Ivan",
    "Emma",
    "Kwame",
    "Laura",
    "Mateo",
    "Hannah",
    "Omar",
    "Grace",
    "Noah",
    "Elena",
    "Samuel",
    "Zara",
    "Ben",
    "Ines",
    "Raj",
    "Chloe",
    "Diego",
    "Nadia",
    "Peter",
    "Lina",
    "Hugo",
    "Mei",
    "Ahmed",
    "Julia",
    "Felix",
    "Rosa",
    "Kenji",
)
PRODUCTS = (
    "wireless headset",
    "coffee grinder",
    "standing desk",
    "air fryer",
    "phone case",
    "robot vacuum",
    "yoga mat",
    "electric kettle",
    "gaming mouse",
    "winter jacket",
    "smart watch",
    "desk lamp",
    "blender",
    "office chair",
    "pair of hiking boots",
    "bluetooth speaker",
    "baby monitor",
    "espresso machine",
    "laptop stand",
    "pair of running shoes",
    "tablet",
    "rice cooker",
    "backpack",
    "toaster",
    "webcam",
    "mechanical keyboard",
    "hair dryer",
    "camping tent",
    "water bottle",
    "e-reader",
    "monitor",
    "sofa cushion set",
    "kids' bike",
    "printer",
    "drone",
    "fitness tracker",
    "microwave",
    "suitcase",
    "board game",
    "cookware set",
)
PARTS = (
    "charging cable",
    "power adapter",
    "remote",
    "manual",
    "lid",
    "second cushion",
    "mounting screws",
    "battery",
    "carrying case",
    "filter",
)
PLANS = ("Premium", "Family", "Pro", "Plus", "Annual", "Student", "Streaming", "Cloud Storage")
DATES = (
    "March 3",
    "last Monday",
    "two weeks ago",
    "June 14",
    "the 2nd",
    "last Friday",
    "October 21",
    "ten days ago",
    "January 9",
    "the start of the month",
    "May 27",
    "a month ago",
)
OCCASIONS = ("my daughter's birthday", "a trip", "work", "my exams", "the holidays", "a wedding", "my new flat")

OPENERS = (
    "",
    "Hi,",
    "Hello,",
    "Hey.",
    "Seriously?",
    "This is ridiculous.",
    "I can't believe this.",
    "Third time writing!",
    "Good morning,",
    "Unbelievable.",
    "Hi there,",
    "OK, I'm fed up.",
)
COMPLAINTS = (
    "",
    "This is unacceptable.",
    "I'm really frustrated.",
    "I've been a customer for {years} years and this is how you treat me?",
    "I needed it for {occasion}.",
    "Nobody answers the phone.",
    "I'm done waiting.",
    "Honestly, I'm furious.",
    "Your chat bot is useless.",
    "I've wasted hours on this.",
    "This is the worst service I've had.",
    "I'm so disappointed.",
)
DEMANDS = (
    "",
    "Fix this now.",
    "What are you going to do about it?",
    "I want my money back.",
    "Can someone please help?",
    "Please sort this out today.",
    "I want to speak to a manager.",
    "Answer me this time.",
    "What now?",
    "I expect a proper answer.",
)
SIGNOFFS = ("", "", "- {name}", "Thanks, {name}", "{name}", "Regards, {name}")

ISSUES: dict[str, tuple[str, ...]] = {
    "late": (
        "I ordered a {product} on {date} (order {order}) and it still hasn't arrived.",
        "My order {order} for a {product} was supposed to arrive {days} days ago. Still nothing.",
        "Where is my {product}? Order {order}, placed {date}, and the tracking hasn't moved in {days} days.",
    ),
    "wrong_item": (
        "I ordered a {product} but received a {other} instead. Order {order}.",
        "Order {order} came today and it's a {other}, not the {product} I paid {amount} for.",
        "You sent me a {other}. I ordered a {product}! Order number {order}.",
    ),
    "refund": (
        "I returned the {product} from order {order} on {date} and I still haven't got my {amount} refund.",
        "You promised a refund of {amount} for order {order} {days} days ago. Where is it?",
        "My refund for the {product} (order {order}, {amount}) has not shown up on my card.",
    ),
    "double_charge": (
        "I was charged {amount} twice for order {order}.",
        "My card statement shows two charges of {amount} for the same {product} (order {order}).",
        "Why did you bill me twice? Order {order}, {amount} each time.",
    ),
    "broken": (
        "The {product} from order {order} stopped working after {days} days.",
        "My {product} arrived broken, the box was crushed. Order {order}.",
        "The {product} I bought on {date} (order {order}) won't even turn on.",
    ),
    "missing_part": (
        "Order {order} arrived without the {part} for my {product}.",
        "The {product} box from order {order} had no {part} in it.",
    ),
    "locked": (
        "I'm locked out of my account (customer ID {customer}) and the reset email never comes.",
        "Your site says my account {customer} is suspended. I have done nothing wrong.",
        "I can't log in since {date}. Customer number {customer}. The password reset link is broken.",
    ),
    "subscription": (
        "I cancelled my {plan} subscription on {date} but you still charged me {amount}.",
        "You renewed my {plan} plan without asking and took {amount}. Account {customer}.",
        "My {plan} subscription was cancelled by you for no reason and I lost access. Account {customer}.",
    ),
}

# The reference (empathetic + helpful) action for each issue: concrete, with the number the customer gave.
ACTIONS: dict[str, tuple[str, ...]] = {
    "late": (
        "I've upgraded order {order} to express shipping at no cost, and you'll get a new tracking link today.",
        "I've reshipped order {order} by courier; it should reach you within two days.",
    ),
    "wrong_item": (
        "I've sent the correct {product} for order {order} by express, and a free return label for the {other}.",
        "I've arranged a replacement {product} for order {order}; keep the {other}, no need to return it.",
    ),
    "refund": (
        "I've escalated order {order} and issued the {amount} refund today; it shows on your card in 3-5 days.",
        "The {amount} refund for order {order} is now issued, and I've added a small credit for the wait.",
    ),
    "double_charge": (
        "I've reversed the duplicate {amount} charge on order {order}; you'll see it back within 3 days.",
        "I've refunded the second {amount} payment for order {order} and confirmed it by email.",
    ),
    "broken": (
        "I've arranged a free replacement {product} for order {order} and emailed you a prepaid return label.",
        "I can send a new {product} for order {order} today or refund you in full, whichever you prefer.",
    ),
    "missing_part": (
        "I've shipped the missing {part} for order {order} by express; it arrives in two days.",
        "I've sent a new {part} for order {order} today, free of charge.",
    ),
    "locked": (
        "I've unlocked account {customer} and sent a fresh reset link to your email; it works for 24 hours.",
        "I've restored access to account {customer}; please set a new password from the link I just sent.",
    ),
    "subscription": (
        "I've refunded the {amount} charge on account {customer} and confirmed your {plan} cancellation.",
        "I've reactivated your {plan} plan on account {customer} and credited {amount} for the trouble.",
    ),
}

APOLOGIES = (
    "I'm so sorry about this, I understand how frustrating it is.",
    "I completely understand your frustration, and I apologise.",
    "I'm sorry we let you down, and I understand why you're upset.",
    "I'm really sorry for the trouble, that's not the experience we want for you.",
    "I apologise for the hassle, you deserve better.",
)
GREETINGS = ("Hi {name}!", "Hello {name}.", "Hi {name}, thanks for writing.", "Dear {name}, thank you for telling us.")
ANON_GREETINGS = ("Hi there!", "Hello.", "Hi, thanks for writing.")
CLOSINGS = (
    "",
    "Thank you for your patience.",
    "Is there anything else I can help with?",
    "Thanks for bearing with us.",
    "Please reply here if anything else goes wrong.",
)
CURT = ("{action}", "Noted. {action}", "{action} Nothing else needed.", "Done. {action}")
VAGUE = (
    "Thank you so much for reaching out! We truly value you as a customer and we're always happy to help.",
    "We appreciate your message and your patience. Our team will look into things and be in touch soon.",
    "Thanks for contacting us! We're sorry for any inconvenience. Have a wonderful day!",
    "We value your feedback and will pass it on. Thank you for choosing us, have a great day!",
)
RUDE = (
    "That's your fault for ordering so late. Stop emailing us.",
    "Read the FAQ. We don't have time for complaints like this.",
    "Calm down. Your complaint is ridiculous and we won't do anything about it.",
    "Not our problem. Stop wasting our time with angry messages.",
    "We can't help you. Complaining won't change anything.",
)
OFF_TOPIC = (
    "Did you know our summer sale is on? Get 20% off every {other} this week!",
    "Our stores are closed on public holidays. Have you tried our new loyalty app?",
    "Fun fact: our {other} is the best seller of the year. Want one?",
    "Please rate our newsletter from 1 to 5 stars.",
)
STYLES = ("empathetic", "curt", "vague", "rude", "off_topic")
SYSTEM_PROMPT = "You are a customer-support assistant. Be kind, concrete and brief."


# --------------------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One customer message and the facts behind it (the slots its replies fill)."""

    issue: str
    prompt: str
    slots: dict[str, str]


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _slots(rng: random.Random) -> dict[str, str]:
    product = _pick(rng, PRODUCTS)
    other = _pick(rng, [p for p in PRODUCTS if p != product])
    return {
        "name": _pick(rng, NAMES),
        "product": product,
        "other": other,
        "part": _pick(rng, PARTS),
        "plan": _pick(rng, PLANS),
        "date": _pick(rng, DATES),
        "occasion": _pick(rng, OCCASIONS),
        "order": f"#{rng.randrange(10_000, 1_000_000)}",
        "customer": f"C-{rng.randrange(1000, 100_000)}",
        "amount": f"${rng.randrange(5, 900)}.{rng.randrange(100):02d}",
        "days": str(rng.randrange(3, 30)),
        "years": str(rng.randrange(2, 15)),
    }


def make_case(rng: random.Random) -> Case:
    """Draw one frustrated customer message: opener + issue + complaint + demand + sign-off."""
    slots = _slots(rng)
    issue = _pick(rng, tuple(ISSUES))
    parts = [
        _pick(rng, OPENERS),
        _pick(rng, ISSUES[issue]),
        _pick(rng, COMPLAINTS),
        _pick(rng, DEMANDS),
        _pick(rng, SIGNOFFS),
    ]
    prompt = " ".join(p for p in parts if p).format(**slots)
    # The reply may only use the name when the customer signed.
    named = dict(slots, name=slots["name"] if slots["name"] in prompt else "")
    return Case(issue=issue, prompt=prompt, slots=named)


def reply(case: Case, style: str, rng: random.Random) -> str:
    """A reply to `case` in one of `STYLES`, phrasing drawn from `rng`."""
    s = case.slots
    action = _pick(rng, ACTIONS[case.issue]).format(**s)
    if style == "empathetic":
        greeting = _pick(rng, GREETINGS) if s["name"] else _pick(rng, ANON_GREETINGS)
        parts = [greeting, _pick(rng, APOLOGIES), action, _pick(rng, CLOSINGS)]
        return " ".join(p for p in parts if p).format(**s)
    if style == "curt":
        terse = action.removeprefix("I've ")
        return _pick(rng, CURT).format(action=terse[0].upper() + terse[1:])
    if style == "vague":
        return _pick(rng, VAGUE)
    if style == "rude":
        return _pick(rng, RUDE)
    if style == "off_topic":
        return _pick(rng, OFF_TOPIC).format(**s)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def unique_cases(rng: random.Random, n: int) -> list[Case]:
    """`n` cases with pairwise distinct prompts (so held-out prompts never appear in training files)."""
    cases: list[Case] = []
    seen: set[str] = set()
    while len(cases) < n:
        case = make_case(rng)
        if case.prompt not in seen:
            seen.add(case.prompt)
            cases.append(case)
    return cases


def _flip_indices(rng: random.Random, n: int, flip_fraction: float) -> set[int]:
    """Exactly round(flip_fraction · n) distinct row indices (a fixed share, not a Bernoulli count)."""
    return set(rng.sample(range(n), round(flip_fraction * n)))


def _scored_candidates(case: Case, styles: Sequence[str], rng: random.Random) -> list[str]:
    """Replies in `styles`, sorted best → worst by `gold_score` (ties keep the draw order)."""
    replies = [reply(case, style, rng) for style in styles]
    scores = [gold_score(case.prompt, r) for r in replies]
    return [replies[i] for i in sorted(range(len(replies)), key=lambda i: -scores[i])]


def preference_rows(cases: Sequence[Case], rng: random.Random, flip_fraction: float) -> list[dict[str, str]]:
    """One pair per case: two replies of different styles, chosen = higher gold score; a share flipped."""
    rows = []
    for case in cases:
        while True:
            best, worst = _scored_candidates(case, rng.sample(STYLES, 2), rng)
            if gold_score(case.prompt, best) > gold_score(case.prompt, worst):  # a tie has no label
                break
        rows.append({"prompt": case.prompt, "chosen": best, "rejected": worst})
    for i in _flip_indices(rng, len(rows), flip_fraction):
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    return rows


def ranking_rows(cases: Sequence[Case], rng: random.Random, flip_fraction: float, k: int = 4) -> list[dict[str, Any]]:
    """One ranking of `k` replies of distinct styles per case, best → worst; a share with one adjacent swap."""
    rows = [{"prompt": c.prompt, "responses": _scored_candidates(c, rng.sample(STYLES, k), rng)} for c in cases]
    for i in sorted(_flip_indices(rng, len(rows), flip_fraction)):
        j = rng.randrange(k - 1)
        responses = rows[i]["responses"]
        responses[j], responses[j + 1] = responses[j + 1], responses[j]
    return rows


def chat_demonstration(case: Case, rng: random.Random) -> dict[str, list[Message]]:
    """A conversational demonstration: system prompt, then either the message itself or a two-exchange chat
    where the assistant first asks what happened."""
    prompt = [{"role": "system", "content": SYSTEM_PROMPT}]
    if rng.random() < 0.5:
        prompt += [
            {"role": "user", "content": "Hi, I need help with an order."},
            {"role": "assistant", "content": "Of course, I'm here to help. What happened?"},
        ]
    prompt.append({"role": "user", "content": case.prompt})
    return {"prompt": prompt, "response": [{"role": "assistant", "content": reply(case, "empathetic", rng)}]}


@dataclass(frozen=True)
class SupportBotSizes:
    """Rows per file at scale 1 (every count is multiplied by `--scale`)."""

    demonstrations: int = 600
    demonstrations_chat: int = 32
    preferences: int = 600
    rankings: int = 150
    prompts_train: int = 200
    prompts_eval: int = 64

    def scaled(self, scale: int) -> SupportBotSizes:
        return SupportBotSizes(**{k: v * scale for k, v in asdict(self).items()})


def generate(seed: int = 0, scale: int = 1, flip_fraction: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """Every file's rows, keyed by file stem. Prompts are distinct across (and within) all files."""
    if scale < 1:
        raise ValueError(f"scale must be ≥ 1, got {scale}")
    if not 0.0 <= flip_fraction <= 0.5:
        raise ValueError(f"flip_fraction must be in [0, 0.5] (above ½ the labels invert), got {flip_fraction}")
    sizes = asdict(SupportBotSizes().scaled(scale))
    rng = random.Random(seed)
    cases = unique_cases(rng, sum(sizes.values()))
    chunks, start = {}, 0
    for name, n in sizes.items():
        chunks[name], start = cases[start : start + n], start + n
    return {
        "demonstrations": [
            {"prompt": c.prompt, "response": reply(c, "empathetic", rng)} for c in chunks["demonstrations"]
        ],
        "demonstrations_chat": [chat_demonstration(c, rng) for c in chunks["demonstrations_chat"]],
        "preferences": preference_rows(chunks["preferences"], rng, flip_fraction),
        "rankings": ranking_rows(chunks["rankings"], rng, flip_fraction),
        "prompts_train": [{"prompt": c.prompt} for c in chunks["prompts_train"]],
        "prompts_eval": [{"prompt": c.prompt} for c in chunks["prompts_eval"]],
    }


def support_corpus(seed: int = 0, num_cases: int = 400) -> list[str]:
    """Text for training a tiny tokenizer: `num_cases` prompts, each followed by one reply in every style."""
    rng = random.Random(seed)
    return [
        text
        for case in unique_cases(rng, num_cases)
        for text in (case.prompt, *(reply(case, style, rng) for style in STYLES))
    ]


def tokenizer_corpus() -> list[str]:
    """`support_corpus(seed=0)`: the default corpus `rlhf_core.tiny` trains its tokenizer on."""
    return support_corpus(0)


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def jsonl_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    """Rows as canonical JSON lines: sorted keys, no spaces, UTF-8 (not \\u escapes), one `\\n` per row."""
    lines = (json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" for r in rows)
    return "".join(lines).encode("utf-8")


def _readme(manifest: dict[str, Any]) -> str:
    lines = [
        "# support_bot: the bundled customer-support task",
        "",
        "Generated by `python -m rlhf_core.support_bot --out data/support_bot "
        f"--seed {manifest['seed']} --scale {manifest['scale']}`; do not edit by hand (see `docs/data.md`).",
        f"Labels: `rlhf_core.support_bot.gold_score` (VADER + helpfulness), {manifest['flip_fraction']:.0%} flipped.",
        "",
        "| file | rows | flipped | sha256 |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in manifest["files"].items():
        lines.append(f"| `{name}` | {info['rows']} | {info.get('flipped', '')} | `{info['sha256']}` |")
    return "\n".join(lines) + "\n"


def write_dataset(out: str | Path, seed: int = 0, scale: int = 1, flip_fraction: float = 0.1) -> dict[str, Any]:
    """Generate and write every file plus `manifest.json` and `README.md` into `out`; returns the manifest.

    The sha256 of a `.jsonl` file equals `schemas.content_digest` of its rows (same canonical serialisation).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for name, rows in generate(seed, scale, flip_fraction).items():
        data = jsonl_bytes(rows)
        (out / f"{name}.jsonl").write_bytes(data)
        files[f"{name}.jsonl"] = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
        if name in ("preferences", "rankings"):
            files[f"{name}.jsonl"]["flipped"] = round(flip_fraction * len(rows))
    manifest = {
        "generator": "rlhf_core.support_bot",
        "seed": seed,
        "scale": scale,
        "flip_fraction": flip_fraction,
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(manifest), encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the bundled support-bot dataset.")
    parser.add_argument("--out", type=Path, default=Path("data/support_bot"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=1, help="multiply every file's row count (benchmarks)")
    parser.add_argument("--flip-fraction", type=float, default=0.1, help="share of noisy labels")
    args = parser.parse_args(argv)
    manifest = write_dataset(args.out, args.seed, args.scale, args.flip_fraction)
    for name, info in manifest["files"].items():
        print(f"{args.out / name}: {info['rows']} rows")


if __name__ == "__main__":
    main()
