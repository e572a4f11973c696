"""Reward model: Bradley–Terry on preferences or rankings (all pairs of a ranking from one forward), margins,
held-out accuracy, normalisation, saved layout, exact resume."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.interrupt import InterruptAt
from helpers.pickles import assert_no_pickles
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from rlhf_core.callbacks import ListLogger
from rlhf_core.models import load_reward_model, reward_model_from_causal_lm, score_sequences
from rlhf_core.packing import pack_groups
from rlhf_core.tokenization import collate_right_padded
from rlhf_core.trainers import reward as reward_module
from rlhf_core.trainers.common import LoRAConfig
from rlhf_core.trainers.reward import (
    RewardConfig,
    collate_comparisons,
    encode_comparisons,
    reward_stage,
    score_batch,
    train_reward_model,
)

ISSUES = [
    "my parcel is late",
    "I was charged twice",
    "the app crashes",
    "I forgot my password",
    "the screen is cracked",
    "can I change my address",
]
RUDE = ["Not my problem.", "Figure it out yourself.", "We do not care.", "Stop writing to us."]
CPU = torch.device("cpu")


def preferences(n: int, offset: int = 0) -> list[dict]:
    """Helpful, polite answers preferred over rude dismissals."""
    return [
        {
            "prompt": f"Hello, {ISSUES[i % 6]}. Order {i}.",
            "chosen": f"I am sorry that {ISSUES[i % 6]}. I will fix order {i} for you today.",
            "rejected": RUDE[i % 4],
        }
        for i in range(offset, offset + n)
    ]


def rankings(n: int) -> list[dict]:
    """Three responses per prompt, best first."""
    return [
        {
            "prompt": f"Hello, {ISSUES[i % 6]}. Order {i}.",
            "responses": [
                f"I am sorry that {ISSUES[i % 6]}. I will fix order {i} today.",
                f"I will look at order {i}.",
                RUDE[i % 4],
            ],
        }
        for i in range(n)
    ]


def _config(**overrides) -> RewardConfig:
    base = {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-3, "progress_bar": False}
    return RewardConfig(**{**base, **overrides})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_reward_model_ranks_held_out_pairs_above_chance(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given preference pairs, when the RM trains, then held-out pairwise accuracy is far above 0.5, the loss
    falls below log 2, and the saved model is a 1-label sequence classifier with a pad token id."""
    logger = ListLogger()
    result = train_reward_model(
        _config(eval_every=6), tiny_model_dir, preferences(32), preferences(16, 100), tmp_path, logger
    )
    assert result.metrics["rm/eval_accuracy"] >= 0.9
    assert result.metrics["rm/eval_loss"] < math.log(2)
    assert logger.series("rm/loss")[-1] < logger.series("rm/loss")[0]
    for name in ("rm/reward_mean", "rm/reward_std", "rm/accuracy", "rm/tokens_per_sec", "rm/peak_memory_mb"):
        assert name in result.metrics
    model = load_reward_model(result.model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None


def _bundled(name: str) -> list[dict]:
    path = Path(__file__).resolve().parents[1] / "data" / "support_bot" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_reward_model_beats_chance_on_held_out_bundled_pairs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given the bundled support-bot preferences, when the RM trains on 96 pairs, then it ranks 64 held-out
    pairs well above chance (0.5)."""
    rows = _bundled("preferences")
    result = train_reward_model(
        _config(max_steps=24, batch_size=8, eval_batch_size=16),
        tiny_model_dir,
        rows[:96],
        rows[-64:],
        tmp_path,
    )
    assert result.metrics["rm/eval_accuracy"] > 0.7


def test_a_ranking_is_scored_once_and_yields_all_pairs(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Given 2 rankings of K = 3, the batch holds 6 sequences (each response once) and 2·K(K−1)/2 = 6 pairs
    (i better than j for i < j); its loss equals −mean log σ(r_i − r_j) over those pairs, with each pair
    scored from the same sequences in a separate preference batch."""
    model = reward_model_from_causal_lm(tiny_model_dir, dtype=torch.float32).eval()
    rows = rankings(2)
    batch = collate_comparisons(encode_comparisons(tiny_tokenizer, rows, _config()), tiny_tokenizer.pad_token_id, CPU)
    assert batch["input_ids"].shape[0] == 6
    assert batch["chosen_index"].tolist() == [0, 0, 1, 3, 3, 4]
    assert batch["rejected_index"].tolist() == [1, 2, 2, 4, 5, 5]
    stage = reward_stage(tiny_tokenizer.pad_token_id, CPU)
    with torch.no_grad():
        loss_sum, sums = stage.loss(model, batch)
    assert sums["count"] == 6 and sums["responses"] == 6

    pair_rows = [
        {"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
        for r in rows
        for i, j in combinations(range(3), 2)
    ]
    pair_batch = collate_comparisons(
        encode_comparisons(tiny_tokenizer, pair_rows, _config()), tiny_tokenizer.pad_token_id, CPU
    )
    with torch.no_grad():
        scores = score_batch(model, pair_batch)
    expected = -F.logsigmoid(scores[pair_batch["chosen_index"]] - scores[pair_batch["rejected_index"]]).sum()
    torch.testing.assert_close(loss_sum, expected, atol=1e-5, rtol=1e-6)


def test_margin_column_enters_the_loss(tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    """With a margin m per pair the loss is −log σ(r_w − r_l − m), computed here from the scores by hand."""
    model = reward_model_from_causal_lm(tiny_model_dir, dtype=torch.float32).eval()
    rows = [{**row, "margin": m} for row, m in zip(preferences(3), [0.0, 1.5, 3.0], strict=True)]
    batch = collate_comparisons(encode_comparisons(tiny_tokenizer, rows, _config()), tiny_tokenizer.pad_token_id, CPU)
    with torch.no_grad():
        loss_sum, _ = reward_stage(tiny_tokenizer.pad_token_id, CPU).loss(model, batch)
        scores = score_batch(model, batch)
    diff = scores[0::2] - scores[1::2]
    expected = -F.logsigmoid(diff - torch.tensor([0.0, 1.5, 3.0])).sum()
    torch.testing.assert_close(loss_sum, expected, atol=1e-6, rtol=1e-6)


def test_training_scores_match_the_shared_scorer(tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    """The trainer's scorer and `models.score_sequences` (used by PPO and evaluation) agree exactly."""
    model = reward_model_from_causal_lm(tiny_model_dir, dtype=torch.float32).eval()
    pairs = encode_comparisons(tiny_tokenizer, preferences(3), _config())
    batch = collate_right_padded([r for c in pairs for r in c.responses], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        ours = score_batch(model, batch)
        shared = score_sequences(model, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(ours, shared)


def test_a_packed_batch_scores_and_trains_like_the_padded_one(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Rankings (K = 3) and preference pairs packed into one row, each prompt once (`rlhf_core.packing`), get the
    scores `models.score_sequences` gives each response in a right-padded batch, and the same gradient of the
    Bradley–Terry loss."""
    model = reward_model_from_causal_lm(tiny_model_dir, dtype=torch.float32).eval()
    twin = reward_model_from_causal_lm(tiny_model_dir, dtype=torch.float32).eval()
    comparisons = encode_comparisons(tiny_tokenizer, rankings(2), _config()) + encode_comparisons(
        tiny_tokenizer, preferences(2), _config()
    )
    packed = collate_comparisons(comparisons, tiny_tokenizer.pad_token_id, CPU, pack=True)
    padded = collate_comparisons(comparisons, tiny_tokenizer.pad_token_id, CPU)
    assert "last" in packed and packed["input_ids"].shape[0] == 1 and "last" not in padded
    assert packed["chosen_index"].tolist() == padded["chosen_index"].tolist()

    with torch.no_grad():
        expected = score_sequences(twin, padded["input_ids"], padded["attention_mask"])
    torch.testing.assert_close(score_batch(model, packed), expected, atol=1e-5, rtol=1e-5)

    stage = reward_stage(tiny_tokenizer.pad_token_id, CPU)
    stage.loss(model, packed)[0].backward()
    stage.loss(twin, padded)[0].backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rankings_train_the_reward_model(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rankings train the RM to held-out accuracy ≥ 0.8, through packed batches (the tiny model's attention is
    sdpa; the real `pack_groups`, counted)."""
    packed = []

    def counting(*args, **kwargs):
        packed.append(1)
        return pack_groups(*args, **kwargs)

    monkeypatch.setattr(reward_module, "pack_groups", counting)
    logger = ListLogger()
    result = train_reward_model(_config(max_steps=8), tiny_model_dir, rankings(16), rankings(6), tmp_path, logger)
    assert len(packed) >= 8
    assert result.metrics["rm/eval_accuracy"] >= 0.8
    assert logger.series("rm/loss")[-1] < logger.series("rm/loss")[0]


def test_normalisation_stores_the_offset_as_the_head_bias(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Given `normalize_rewards`, then the saved head has bias −μ, where μ is the mean bias-free score of
    every training response, so the training responses score mean 0 with the bias applied."""
    rows = preferences(8)
    result = train_reward_model(_config(max_steps=4, normalize_rewards=True), tiny_model_dir, rows, [], tmp_path)
    offset = result.metrics["rm/reward_offset"]
    weights = _weights(result.model_dir)
    assert weights["score.bias"].item() == pytest.approx(-offset, abs=1e-6)

    model = load_reward_model(result.model_dir, dtype=torch.float32).eval()
    assert model.config.reward_offset == pytest.approx(offset)
    comparisons = encode_comparisons(tiny_tokenizer, rows, _config())
    batch = collate_right_padded([r for c in comparisons for r in c.responses], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            output_hidden_states=True,
        )
        last = batch["attention_mask"].sum(1) - 1
        hidden = out.hidden_states[-1][torch.arange(len(last)), last]
        normalised = hidden @ weights["score.weight"].T + weights["score.bias"]
        loaded_scores = score_sequences(model, batch["input_ids"], batch["attention_mask"])
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-5)
    # The loader keeps the bias (HF's Llama classifier alone would drop it and score +μ on average).
    assert model.score.bias is not None
    assert loaded_scores.mean().item() == pytest.approx(0.0, abs=1e-5)


def test_kill_and_resume_ends_with_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = _config(max_steps=6, batch_size=2, checkpoint_every=2)
    rows = preferences(10)
    straight = train_reward_model(config, tiny_model_dir, rows, [], tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(config, tiny_model_dir, rows, [], tmp_path / "resumed", InterruptAt(5))
    resumed = train_reward_model(config, tiny_model_dir, rows, [], tmp_path / "resumed")
    assert resumed.resumed_from_step == 4
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    assert_no_pickles(tmp_path / "straight")
    assert_no_pickles(tmp_path / "resumed")


def test_lora_reward_model_trains_the_head_and_saves_merged(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = train_reward_model(
        _config(max_steps=8, lora=LoRAConfig(r=4), learning_rate=5e-3),
        tiny_model_dir,
        preferences(16),
        preferences(8, 50),
        tmp_path,
    )
    assert result.metrics["rm/eval_accuracy"] >= 0.75
    names = set(_weights(result.model_dir))
    assert "score.weight" in names and not any("lora" in n or "modules_to_save" in n for n in names)
