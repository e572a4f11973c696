"""The bundled support-bot task: byte-identical regeneration, file layout, labels from the gold judge, flips."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_core import tiny
from rlhf_core.gold_judge import EMPTY_SCORE, entities
from rlhf_core.support_bot import (
    STYLES,
    SupportBotSizes,
    generate,
    gold_score,
    main,
    reply,
    support_corpus,
    tokenizer_corpus,
    unique_cases,
)
from schemas import content_digest, load_rows

DATA = Path(__file__).parents[1] / "data" / "support_bot"
KINDS = {
    "demonstrations": "demonstration",
    "demonstrations_chat": "demonstration",
    "preferences": "preference",
    "rankings": "ranking",
    "prompts_train": "prompt",
    "prompts_eval": "prompt",
}
VADER = SentimentIntensityAnalyzer()
PROMPT = "My order #48213 was charged twice, $23.45 each time. Fix it! - Maria"


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {name: [json.loads(line) for line in (DATA / f"{name}.jsonl").open(encoding="utf-8")] for name in KINDS}


# --------------------------------------------------------------------------------------------------------------
# Reproducibility and layout
# --------------------------------------------------------------------------------------------------------------


def test_committed_data_regenerates_byte_identically(tmp_path: Path) -> None:
    # Given the committed files, when the generator runs again with the manifest's seed and scale,
    manifest = json.loads((DATA / "manifest.json").read_text())
    main(["--out", str(tmp_path), "--seed", str(manifest["seed"]), "--scale", str(manifest["scale"])])
    # then every file (data, manifest, README) is byte-for-byte the same.
    committed = sorted(p.name for p in DATA.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_another_seed_gives_other_data() -> None:
    assert generate(seed=1)["prompts_eval"] != generate(seed=0)["prompts_eval"]


def test_manifest_counts_and_digests_match_the_files(rows: dict[str, list[dict]]) -> None:
    manifest = json.loads((DATA / "manifest.json").read_text())
    sizes = vars(SupportBotSizes())
    assert sizes == {
        "demonstrations": 600,
        "demonstrations_chat": 32,
        "preferences": 600,
        "rankings": 150,
        "prompts_train": 200,
        "prompts_eval": 64,
    }
    for name, kind in KINDS.items():
        info = manifest["files"][f"{name}.jsonl"]
        loaded = load_rows(DATA / f"{name}.jsonl", kind)  # every bundled file passes validation
        assert loaded.num_rows == info["rows"] == sizes[name] == len(rows[name])
        # The file's sha256 is the content digest of its rows: one serialisation for files and lineage.
        assert loaded.digest == f"sha256:{info['sha256']}" == content_digest(rows[name])
        assert hashlib.sha256((DATA / f"{name}.jsonl").read_bytes()).hexdigest() == info["sha256"]


def test_scale_multiplies_every_file() -> None:
    scaled = generate(seed=0, scale=2)
    assert {name: len(r) for name, r in scaled.items()} == {k: 2 * v for k, v in vars(SupportBotSizes()).items()}
    with pytest.raises(ValueError, match="scale"):
        generate(scale=0)


def test_prompts_are_distinct_and_held_out_prompts_never_appear_in_training_files(rows: dict[str, list[dict]]) -> None:
    def prompts(name: str) -> list[str]:
        return [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"] for r in rows[name]]

    everything = [p for name in KINDS for p in prompts(name)]
    assert len(everything) == len(set(everything)) == sum(vars(SupportBotSizes()).values())
    assert set(prompts("prompts_eval")).isdisjoint(p for name in KINDS if name != "prompts_eval" for p in prompts(name))


def test_prompts_vary_combinatorially(rows: dict[str, list[dict]]) -> None:
    prompts = [r["prompt"] for r in rows["prompts_train"]]
    order_numbers = {e for p in prompts for e in entities(p) if len(e) >= 5}
    first_words = {" ".join(p.split()[:3]) for p in prompts}
    assert len(order_numbers) >= 150 and len(first_words) >= 60
    for issue in ("arrived", "refund", "twice", "locked", "subscription", "received"):
        assert any(issue in p for p in prompts), issue


def test_demonstrations_are_short_empathetic_and_name_the_customers_order(rows: dict[str, list[dict]]) -> None:
    for row in rows["demonstrations"]:
        assert len(row["response"].split()) < 60
        assert entities(row["prompt"]) & entities(row["response"]), row
    chat = rows["demonstrations_chat"]
    assert load_rows(DATA / "demonstrations_chat.jsonl", "demonstration", conversational=True).num_rows == len(chat)
    assert {len(r["prompt"]) for r in chat} == {2, 4}  # system + user, or system + a first exchange + user


# --------------------------------------------------------------------------------------------------------------
# The gold judge
# --------------------------------------------------------------------------------------------------------------


def test_gold_score_is_vader_compound_plus_helpfulness() -> None:
    empathetic = "Hi Maria! I'm so sorry. I have refunded the duplicate $23.45 charge on order #48213 today."
    vague = "Thank you for reaching out! Have a wonderful day!"
    curt = "Order #48213: noted."
    # compound + 1[entity of the prompt] + 1[action word]
    assert gold_score(PROMPT, empathetic) == pytest.approx(VADER.polarity_scores(empathetic)["compound"] + 2, abs=1e-12)
    assert gold_score(PROMPT, vague) == pytest.approx(VADER.polarity_scores(vague)["compound"], abs=1e-12)
    assert gold_score(PROMPT, curt) == pytest.approx(VADER.polarity_scores(curt)["compound"] + 1, abs=1e-12)


def test_rude_reply_scores_below_an_empathetic_helpful_one() -> None:
    rude = "Go away. Your complaint is ridiculous and we won't do anything."
    helpful = "I'm really sorry, Maria. I've refunded the second $23.45 payment for order #48213."
    assert gold_score(PROMPT, rude) < 0 < 1.5 < gold_score(PROMPT, helpful)


def test_empty_long_and_repetitive_replies_are_penalised() -> None:
    assert gold_score(PROMPT, "") == gold_score(PROMPT, "   \n") == EMPTY_SCORE
    base = "I've refunded order #48213."
    assert gold_score(PROMPT, base) == pytest.approx(VADER.polarity_scores(base)["compound"] + 2, abs=1e-12)
    repetitive = "refund refund refund refund refund refund refund refund"  # 8 words, 1 distinct
    assert gold_score(PROMPT, repetitive) == pytest.approx(
        VADER.polarity_scores(repetitive)["compound"] + 1 - 1, abs=1e-12
    )
    long = base + " " + " ".join(f"w{i}" for i in range(80))  # 84 distinct words
    assert gold_score(PROMPT, long) == pytest.approx(VADER.polarity_scores(long)["compound"] + 2 - 1, abs=1e-12)


def test_entities_are_whole_numbers_of_at_least_three_characters() -> None:
    assert entities(PROMPT) == {"48213", "23.45"}
    assert entities("within 3-5 days, on the 2nd, account C-4821") == {"3-5", "4821"}
    assert gold_score("Order #482135", "We refund within 3 days.") == gold_score(
        "Order #999999", "We refund within 3 days."
    )


def test_gold_score_accepts_conversations() -> None:
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": PROMPT}]
    response = [{"role": "assistant", "content": "I've refunded order #48213."}]
    assert gold_score(prompt, response) == gold_score(PROMPT, "I've refunded order #48213.")


def test_styles_rank_as_expected_on_average() -> None:
    rng = random.Random(5)
    cases = unique_cases(rng, 200)
    mean = {s: sum(gold_score(c.prompt, reply(c, s, rng)) for c in cases) / len(cases) for s in STYLES}
    assert min(mean["empathetic"], mean["curt"]) > mean["vague"] > mean["rude"]
    assert mean["off_topic"] > mean["rude"]


# --------------------------------------------------------------------------------------------------------------
# Labels: ordered by the judge, with a fixed share flipped
# --------------------------------------------------------------------------------------------------------------


def _misordered_pairs(pairs: list[dict]) -> int:
    return sum(gold_score(r["prompt"], r["chosen"]) < gold_score(r["prompt"], r["rejected"]) for r in pairs)


def _unsorted_rankings(rankings: list[dict]) -> int:
    def sorted_by_gold(row: dict) -> bool:
        scores = [gold_score(row["prompt"], r) for r in row["responses"]]
        return all(a >= b for a, b in zip(scores, scores[1:], strict=False))

    return sum(not sorted_by_gold(r) for r in rankings)


def test_committed_labels_follow_the_judge_with_ten_percent_flipped(rows: dict[str, list[dict]]) -> None:
    # Exactly round(0.1 · n) rows disagree with the judge: a fixed share, not a random count.
    assert _misordered_pairs(rows["preferences"]) == 60
    assert _unsorted_rankings(rows["rankings"]) == 15
    assert {len(r["responses"]) for r in rows["rankings"]} == {4}


@pytest.mark.parametrize("flip_fraction", [0.0, 0.25])
def test_flip_fraction_is_respected(flip_fraction: float) -> None:
    data = generate(seed=3, flip_fraction=flip_fraction)
    assert _misordered_pairs(data["preferences"]) == round(flip_fraction * 600)
    assert _unsorted_rankings(data["rankings"]) == round(flip_fraction * 150)


def test_flip_fraction_above_one_half_is_refused() -> None:
    with pytest.raises(ValueError, match="flip_fraction"):
        generate(flip_fraction=0.6)


def test_tokenizer_corpus_is_the_seeded_support_corpus() -> None:
    corpus = tokenizer_corpus()
    assert corpus == support_corpus(0) and corpus != support_corpus(1)
    assert len(corpus) == 400 * (1 + len(STYLES))
    assert tiny._default_corpus() == corpus  # what the tiny tokenizer of every test is trained on


def test_support_bot_imports_no_pandas_or_pandera() -> None:
    # rlhf_core may not depend on the data layer (docs/architecture.md): a fresh interpreter proves it.
    code = "import sys, rlhf_core.support_bot; print(sorted({'pandas', 'pandera'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    )
    assert out.stdout.strip() == "[]"
