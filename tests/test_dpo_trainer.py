"""DPO: margins grow, reference log-probs from one cached pass, one concatenated forward, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.interrupt import InterruptAt
from helpers.pickles import assert_no_pickles
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from rlhf_core.callbacks import ListLogger
from rlhf_core.logprobs import sequence_logprobs
from rlhf_core.packing import packed_logprobs
from rlhf_core.tokenization import collate_right_padded
from rlhf_core.trainers import dpo as dpo_module
from rlhf_core.trainers.common import LoRAConfig
from rlhf_core.trainers.dpo import (
    REFERENCE_CACHE,
    DPOConfig,
    collate_pairs,
    encode_preferences,
    pair_logps,
    train_dpo,
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


def preferences(n: int, offset: int = 0) -> list[dict]:
    """Helpful, polite answers preferred over rude dismissals (a signal even a random model can learn)."""
    rows = []
    for i in range(offset, offset + n):
        issue = ISSUES[i % len(ISSUES)]
        rows.append(
            {
                "prompt": f"Hello, {issue}. Order {i}.",
                "chosen": f"I am sorry that {issue}. I will fix order {i} for you today.",
                "rejected": RUDE[i % len(RUDE)],
            }
        )
    return rows


def _config(**overrides) -> DPOConfig:
    base = {"max_steps": 10, "batch_size": 4, "learning_rate": 1e-3, "dpo_beta": 0.1, "progress_bar": False}
    return DPOConfig(**{**base, **overrides})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_dpo_margins_grow(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given preference pairs, when DPO trains 10 steps, then the implicit reward margin starts at 0 and
    grows, the chosen reward rises above the rejected one, and held-out pairs are ranked right."""
    logger = ListLogger()
    result = train_dpo(_config(), tiny_model_dir, preferences(24), preferences(8, 100), tmp_path, logger)
    margins = logger.series("dpo/reward_margin")
    assert abs(margins[0]) < 1e-4  # policy == reference at the first step
    assert margins[-1] > 1.0 and margins[-1] > margins[len(margins) // 2] > margins[0]
    assert result.metrics["dpo/eval_reward_margin"] > 1.0
    assert result.metrics["dpo/eval_reward_accuracy"] == 1.0
    assert result.metrics["dpo/eval_chosen_rewards"] > result.metrics["dpo/eval_rejected_rewards"]
    assert logger.series("dpo/loss")[-1] < math.log(2)
    for name in ("dpo/chosen_logps", "dpo/rejected_logps", "dpo/tokens_per_sec", "dpo/peak_memory_mb"):
        assert name in result.metrics
    AutoModelForCausalLM.from_pretrained(result.model_dir)


def test_the_prompt_once_per_pair_trains_like_two_whole_sequences(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the same pairs, DPO with each prompt computed once for both responses (packed rows: the tiny model's
    attention is sdpa) and DPO with chosen and rejected as two whole sequences follow the same loss and margin
    curves and end at the same weights (to float rounding)."""
    packed_calls = []

    def counting(*args, **kwargs):  # the real function, counted: shows the trainer took the packed layout
        packed_calls.append(1)
        return packed_logprobs(*args, **kwargs)

    monkeypatch.setattr(dpo_module, "packed_logprobs", counting)
    runs = {}
    for share in (True, False):
        logger = ListLogger()
        result = train_dpo(
            _config(max_steps=6, share_prompt=share), tiny_model_dir, preferences(24), [], tmp_path / str(share), logger
        )
        runs[share] = (logger, _weights(result.model_dir))
        if share:  # the reference pass and 6 steps, all packed
            packed_in_shared_run = len(packed_calls)
            assert packed_in_shared_run >= 7
    assert len(packed_calls) == packed_in_shared_run  # the two-sequence run packs nothing
    for name in ("dpo/loss", "dpo/reward_margin"):
        assert runs[True][0].series(name) == pytest.approx(runs[False][0].series(name), abs=1e-4)
    assert runs[True][0].series("dpo/loss")[-1] < runs[True][0].series("dpo/loss")[0]  # it trained
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "expected"),
    [
        ("sigmoid", 0.0, math.log(2)),
        ("sigmoid", 0.2, math.log(2)),
        ("ipo", 0.0, (1 / (2 * 0.1)) ** 2),
        ("hinge", 0.0, 1.0),
    ],
)
def test_first_step_loss_is_the_zero_margin_value(
    tiny_model_dir: Path, tmp_path: Path, loss_type: str, label_smoothing: float, expected: float
) -> None:
    """At step 1 the policy is the reference, so h = 0: sigmoid −log σ(0) = log 2 (with or without smoothing),
    IPO (0 − 1/(2β))² = 25 at β = 0.1, hinge relu(1 − 0) = 1."""
    logger = ListLogger()
    train_dpo(
        _config(max_steps=1, loss_type=loss_type, label_smoothing=label_smoothing),
        tiny_model_dir,
        preferences(4),
        [],
        tmp_path,
        logger,
    )
    assert logger.series("dpo/loss")[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("share_prompt", "pack", "layout_key"),
    [(True, True, "keep"), (True, False, "prompt_ids"), (False, True, "input_ids")],
    ids=["prompt-once-packed", "prompt-once-kv-cache", "two-sequences"],
)
def test_a_pair_batch_gives_each_response_its_log_prob_from_a_separate_pass(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, share_prompt: bool, pack: bool, layout_key: str
) -> None:
    """Every batch layout of a pair (the prompt once in a packed row, or once with its KV cache shared by both
    responses, or chosen and rejected as whole sequences in one `[2B, L]` pass) gives each response the log-prob
    it gets in a plain right-padded batch of its kind."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = encode_preferences(tiny_tokenizer, preferences(3), _config())
    pad = tiny_tokenizer.pad_token_id
    batch = collate_pairs(pairs, pad, torch.device("cpu"), share_prompt, pack)
    assert layout_key in batch
    with torch.no_grad():
        chosen, rejected = pair_logps(model, batch)
        for responses, joint in ((p.chosen for p in pairs), chosen), ((p.rejected for p in pairs), rejected):
            batch = collate_right_padded(list(responses), pad)
            alone = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
            torch.testing.assert_close(joint, alone, atol=1e-5, rtol=1e-6)


def _reference_by_hand(model_dir: Path, tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = encode_preferences(tokenizer, rows, _config())
    with torch.no_grad():
        # Whole sequences (not the trainer's shared-prompt path), so the check does not reuse the code it checks.
        chosen, rejected = pair_logps(
            model, collate_pairs(pairs, tokenizer.pad_token_id, torch.device("cpu"), share_prompt=False)
        )
    return torch.stack([chosen, rejected], dim=1)


@pytest.mark.parametrize("lora", [None, LoRAConfig(r=4)], ids=["full", "lora"])
def test_reference_logps_are_the_sft_models_and_cached(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path, lora: LoRAConfig | None
) -> None:
    """Given DPO on 6 train + 2 eval pairs, then `reference_logprobs.safetensors` holds the SFT model's log-probs of
    all 8 (with LoRA: the policy with adapters disabled computes exactly those), and a resumed run reuses the
    file instead of recomputing it."""
    train_rows, eval_rows = preferences(6), preferences(2, 50)
    config = _config(max_steps=2, batch_size=2, checkpoint_every=1, lora=lora)
    train_dpo(config, tiny_model_dir, train_rows, eval_rows, tmp_path)
    cache_path = tmp_path / REFERENCE_CACHE
    cache = load_file(cache_path)
    expected = _reference_by_hand(tiny_model_dir, tiny_tokenizer, train_rows + eval_rows)
    torch.testing.assert_close(cache["logps"], expected, atol=1e-5, rtol=1e-6)

    written = cache_path.stat().st_mtime_ns
    longer = train_dpo(
        _config(max_steps=3, batch_size=2, checkpoint_every=1, lora=lora),
        tiny_model_dir,
        train_rows,
        eval_rows,
        tmp_path,
    )
    assert longer.resumed_from_step == 2
    assert cache_path.stat().st_mtime_ns == written


def test_stale_reference_cache_is_recomputed(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A cache written for other pairs (different fingerprint) is not reused."""
    train_dpo(_config(max_steps=1), tiny_model_dir, preferences(4), [], tmp_path / "a")
    other = tmp_path / "b"
    other.mkdir()
    (other / REFERENCE_CACHE).write_bytes((tmp_path / "a" / REFERENCE_CACHE).read_bytes())
    train_dpo(_config(max_steps=1), tiny_model_dir, preferences(4, 20), [], other)
    old, new = (safe_open(path / REFERENCE_CACHE, framework="pt") for path in (tmp_path / "a", other))
    assert old.metadata()["fingerprint"] != new.metadata()["fingerprint"]
    assert not torch.equal(old.get_tensor("logps"), new.get_tensor("logps"))


def test_kill_and_resume_ends_with_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given a DPO run killed after step 4 (checkpoints every 3), when rerun, then it resumes from step 3 and
    ends with the weights of an uninterrupted run."""
    config = _config(max_steps=6, batch_size=2, checkpoint_every=3, warmup_steps=2, lr_schedule="linear")
    rows = preferences(10)
    straight = train_dpo(config, tiny_model_dir, rows, [], tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train_dpo(config, tiny_model_dir, rows, [], tmp_path / "resumed", InterruptAt(4))
    resumed = train_dpo(config, tiny_model_dir, rows, [], tmp_path / "resumed")
    assert resumed.resumed_from_step == 3
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    assert_no_pickles(tmp_path / "straight")
    assert_no_pickles(tmp_path / "resumed")
