"""PPO on a tiny model: it climbs a real reward model with bounded KL, leaves the frozen models untouched,
resumes exactly after a kill, stops cleanly on NaN, refuses an RM at chance, and runs its variants (separate
critic with value warm-up, LoRA with the adaptive KL controller).

The reward model. The tiny policy is an untrained Llama: it samples nearly uniformly from ~500 tokens and almost
never emits EOS, so a reward learned from the bundled chat data would be noise for it. The test instead trains a
real `AutoModelForSequenceClassification` (from the same tiny base, through `models.score_sequences`, the path
PPO scores with) on token-id pairs with a clear target: of two 8-token responses, the one with more tokens from a
fixed half S of the vocabulary is preferred. It reaches > 0.9 held-out accuracy in 40 steps, and its score varies
a lot between the policy's own samples, so a few CPU iterations of PPO can climb it. Responses are 8 tokens with
no EOS in both the RM data and the rollouts (hence `missing_eos_score=None`). Collapsing all mass onto S would cost
KL = 8·log 2 ≈ 5.5 nats against the uniform reference: the bound the KL must stay under.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.pickles import assert_no_pickles
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf_core.callbacks import ListLogger
from rlhf_core.evaluation import evaluate_models
from rlhf_core.generation import SamplingConfig
from rlhf_core.guards import reward_model_accuracy
from rlhf_core.losses import bradley_terry_loss
from rlhf_core.models import VALUE_HEAD_FILE, reward_model_from_causal_lm, score_sequences
from rlhf_core.tokenization import EncodedPair, collate_right_padded, encode_prompt, encode_prompt_response
from rlhf_core.trainers.common import LoRAConfig, NonFiniteLossError, latest_checkpoint
from rlhf_core.trainers.ppo import (
    PPOConfig,
    load_ppo_models,
    run_ppo,
    train_ppo,
)
from rlhf_core.trainers.reward import RewardConfig, train_reward_model

RESPONSE_LEN = 8
PROMPTS = [
    "Where is my order?",
    "Reset my password",
    "I was charged twice",
    "Hi",
    "I want a refund",
    "The app crashes",
    "Change my delivery address",
    "Thanks for the help",
]
ROWS = [{"prompt": p} for p in PROMPTS]
METRICS = [
    "score_mean",
    "kl",
    "kl_coef",
    "entropy",
    "clip_fraction",
    "approx_kl",
    "policy_loss",
    "value_loss",
    "value_clip_fraction",
    "explained_variance",
    "response_length",
    "no_eos_fraction",
    "distinct_2",
    "reward_mean",
    "tokens_per_sec",
    "episodes_per_sec",
    "peak_memory_mb",
    "shaped_score_std",
    "no_eos_penalized_fraction",
    "time_generation_s",
    "time_scoring_s",
    "time_update_s",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on busy shared cores two threads spin against each
    other (measured: 10× slower); restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _config(**overrides) -> PPOConfig:
    # No value warm-up: these tests look at the policy from the first iteration (warm-up has its own test).
    small = dict(
        max_steps=2,
        batch_size=4,
        rollout_batch_size=8,
        ppo_epochs=1,
        max_new_tokens=RESPONSE_LEN,
        missing_eos_score=None,
        learning_rate=4e-3,
        kl_coef=0.2,
        progress_bar=False,
        value_warmup_iterations=0,
    )
    return PPOConfig(**{**small, **overrides})


# --------------------------------------------------------------------------------------------------------------
# The reward model of these tests (see the module docstring)
# --------------------------------------------------------------------------------------------------------------


def _preferred_half(vocab_size: int) -> torch.Tensor:
    """S: a fixed random half of the non-special token ids (0-2 are pad, BOS, EOS)."""
    ids = torch.arange(3, vocab_size)
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))][: len(ids) // 2]


def _token_pairs(tokenizer, count: int, generator: torch.Generator) -> list[tuple[EncodedPair, EncodedPair]]:
    """(chosen, rejected) where chosen has more tokens from S; each response draws from S with its own rate."""
    preferred = _preferred_half(len(tokenizer))
    in_s = torch.zeros(len(tokenizer), dtype=torch.bool)
    in_s[preferred] = True
    others = (~in_s).nonzero().squeeze(1)[3:]
    pairs = []
    while len(pairs) < count:
        responses = []
        for _ in range(2):
            from_s = torch.rand(RESPONSE_LEN, generator=generator) < torch.rand(1, generator=generator)
            s_tok = preferred[torch.randint(len(preferred), (RESPONSE_LEN,), generator=generator)]
            o_tok = others[torch.randint(len(others), (RESPONSE_LEN,), generator=generator)]
            responses.append(torch.where(from_s, s_tok, o_tok))
        a, b = (int(in_s[r].sum()) for r in responses)
        if a == b:
            continue
        prompt = encode_prompt(tokenizer, PROMPTS[len(pairs) % len(PROMPTS)])
        chosen, rejected = responses if a > b else responses[::-1]
        pairs.append((EncodedPair(prompt, chosen.tolist()), EncodedPair(prompt, rejected.tolist())))
    return pairs


def _score_pairs(model, pairs, pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate_right_padded([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    scores = score_sequences(model, batch["input_ids"], batch["attention_mask"])
    return scores[: len(pairs)], scores[len(pairs) :]


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tiny_tokenizer, tmp_path_factory) -> tuple[Path, float]:
    """(path, held-out accuracy) of the test RM, trained with the Bradley–Terry loss: 40 steps of 32 pairs."""
    torch.manual_seed(0)
    model = reward_model_from_causal_lm(tiny_model_dir, seed=0).train()
    generator = torch.Generator().manual_seed(0)
    train, held_out = _token_pairs(tiny_tokenizer, 40 * 32, generator), _token_pairs(tiny_tokenizer, 64, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = train[step * 32 : (step + 1) * 32]
        loss, _ = bradley_terry_loss(*_score_pairs(model, batch, tiny_tokenizer.pad_token_id))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        chosen, rejected = _score_pairs(model, held_out, tiny_tokenizer.pad_token_id)
    accuracy = float((chosen > rejected).float().mean())
    path = tmp_path_factory.mktemp("token_set_rm")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path, accuracy


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


# --------------------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------------------


def test_ppo_raises_the_rm_score_with_bounded_kl_and_frozen_models(tiny_model_dir, reward_model, tmp_path):
    rm_path, rm_accuracy = reward_model
    assert rm_accuracy > 0.8  # a reward model worth climbing
    # Given the SFT policy, the trained RM and a snapshot of the frozen models
    config = _config(max_steps=8, rollout_batch_size=64, batch_size=16, ppo_epochs=2, learning_rate=3e-3)
    models = load_ppo_models(config, tiny_model_dir, rm_path)
    reference_before, rm_before = _state(models.reference), _state(models.reward_model)
    logger = ListLogger()
    # When PPO runs eight iterations
    result = run_ppo(config, models, ROWS, tmp_path / "ppo", logger, reward_model_eval_accuracy=rm_accuracy)

    # Then every iteration reports the stable metric names
    records = [m for _, m in logger.records if "ppo/score_mean" in m]
    assert len(records) == 8 and all(f"ppo/{name}" in m for m in records for name in METRICS)
    # the first iteration's policy is the reference: KL exactly 0 up to float error (docs/pitfalls.md §1)
    kl = logger.series("ppo/kl")
    assert abs(kl[0]) < 1e-5
    # the RM score climbs over iterations, with KL below that of collapsing onto S
    scores = logger.series("ppo/score_mean")
    assert sum(scores[4:]) / 4 > sum(scores[:4]) / 4
    bound = RESPONSE_LEN * math.log(2)
    assert max(kl) < bound
    # the reference and the reward model are bit-identical after training, the policy is not
    assert all(torch.equal(v, reference_before[k]) for k, v in models.reference.state_dict().items())
    assert all(torch.equal(v, rm_before[k]) for k, v in models.reward_model.state_dict().items())
    assert not torch.equal(_weights(result.model_dir)["lm_head.weight"], reference_before["lm_head.weight"])
    # and on held-out samples (same prompts and seeds for both) the PPO policy beats the SFT policy
    report = evaluate_models(
        {"sft": tiny_model_dir, "ppo": result.model_dir},
        PROMPTS * 8,
        SamplingConfig(max_new_tokens=RESPONSE_LEN),
        rm_path,
        tiny_model_dir,
        seed=0,
    )
    sft, ppo = report.metrics["sft"], report.metrics["ppo"]
    margin = 2 * math.hypot(sft["eval/rm_score_stderr"], ppo["eval/rm_score_stderr"])
    assert ppo["eval/rm_score"] - sft["eval/rm_score"] > margin
    assert ppo["eval/win_rate_rm"] > 0.7
    assert 0 < ppo["eval/kl_to_ref"] < bound
    # and the saved policy is a plain causal LM with its value head beside it
    assert (result.model_dir / VALUE_HEAD_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(result.model_dir)


# --------------------------------------------------------------------------------------------------------------
# Resume and failure
# --------------------------------------------------------------------------------------------------------------


class _Killed(Exception):
    """Stands for the process being killed."""


class _KillAfter(ListLogger):
    """Kills the run when the metrics of iteration `step` arrive (after its checkpoint would be written)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.step and "ppo/score_mean" in metrics:
            raise _Killed
        super().log_metrics(metrics, step)


def test_kill_and_resume_follows_the_same_trajectory(tiny_model_dir, reward_model, tmp_path):
    rm_path, accuracy = reward_model
    # Given a config whose state goes beyond the weights: adaptive β and running score moments
    config = _config(max_steps=4, checkpoint_every=2, target_kl=0.5, kl_horizon=50.0, score_norm="mean_std")
    uninterrupted = ListLogger()
    full = train_ppo(
        config, tiny_model_dir, rm_path, ROWS, tmp_path / "full", uninterrupted, reward_model_eval_accuracy=accuracy
    )
    # When a second run is killed during iteration 3 (last checkpoint: iteration 2) and started again
    with pytest.raises(_Killed):
        train_ppo(
            config,
            tiny_model_dir,
            rm_path,
            ROWS,
            tmp_path / "killed",
            _KillAfter(3),
            reward_model_eval_accuracy=accuracy,
        )
    resumed_logger = ListLogger()
    resumed = train_ppo(
        config, tiny_model_dir, rm_path, ROWS, tmp_path / "killed", resumed_logger, reward_model_eval_accuracy=accuracy
    )
    # Then it resumed from iteration 2 and ends where the uninterrupted run ended
    assert resumed.resumed_from_step == 2 and full.resumed_from_step is None
    for name in ("ppo/score_mean", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss"):
        assert resumed_logger.series(name) == pytest.approx(uninterrupted.series(name)[2:], abs=1e-6), name
    full_weights, resumed_weights = _weights(full.model_dir), _weights(resumed.model_dir)
    for key, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, atol=1e-6, rtol=0, msg=key)
    head_full = load_file(str(full.model_dir / VALUE_HEAD_FILE))
    head_resumed = load_file(str(resumed.model_dir / VALUE_HEAD_FILE))
    torch.testing.assert_close(head_resumed["weight"], head_full["weight"], atol=1e-6, rtol=0)
    # and the adaptive β really moved, so its state had to be restored
    assert len(set(uninterrupted.series("ppo/kl_coef"))) > 1
    assert_no_pickles(tmp_path / "full")
    assert_no_pickles(tmp_path / "killed")


@pytest.mark.parametrize("broken", ["reward_model", "reference"])
def test_a_forced_nan_stops_cleanly_keeping_the_last_good_checkpoint(tiny_model_dir, reward_model, tmp_path, broken):
    rm_path, accuracy = reward_model
    out = tmp_path / "ppo"
    # Given one good iteration, checkpointed
    train_ppo(
        _config(max_steps=1, checkpoint_every=1),
        tiny_model_dir,
        rm_path,
        ROWS,
        out,
        reward_model_eval_accuracy=accuracy,
    )
    good = latest_checkpoint(out)
    state_before = (good / "trainer_state.json").read_text()
    # When the run continues with a NaN in the reward model's head (NaN scores) or in the reference's LM head
    # (NaN KL penalties, so NaN rewards and losses)
    config = _config(max_steps=2, checkpoint_every=1)
    models = load_ppo_models(config, tiny_model_dir, rm_path)
    poisoned = models.reward_model.score if broken == "reward_model" else models.reference.lm_head
    with torch.no_grad():
        poisoned.weight.fill_(float("nan"))
    # Then it stops with NonFiniteLossError naming the last good checkpoint, which is intact, and saves no model
    with pytest.raises(NonFiniteLossError) as error:
        run_ppo(config, models, ROWS, out, reward_model_eval_accuracy=accuracy)
    assert error.value.last_checkpoint == good and error.value.step == 1
    assert latest_checkpoint(out) == good and (good / "trainer_state.json").read_text() == state_before
    assert json.loads(state_before)["step"] == 1
    assert (out / "model").exists()  # from the good run (max_steps=1); the failed run wrote nothing newer
    assert not (out / ".tmp-model").exists()


def test_refuses_a_reward_model_at_chance(tiny_model_dir, reward_model, tiny_tokenizer, tmp_path):
    rm_path, _ = reward_model
    # Given a held-out accuracy at chance, PPO refuses to start (docs/pitfalls.md §2) ...
    with pytest.raises(ValueError, match="at chance"):
        train_ppo(_config(), tiny_model_dir, rm_path, ROWS, tmp_path / "a", reward_model_eval_accuracy=0.5)
    # ... also when it measures the accuracy itself: identical responses tie, and a tie is not a win
    ties = [{"prompt": p, "chosen": "Sure.", "rejected": "Sure."} for p in PROMPTS]
    with pytest.raises(ValueError, match="accuracy 0.000"):
        train_ppo(_config(), tiny_model_dir, rm_path, ROWS, tmp_path / "b", reward_model_eval_pairs=ties)
    # ... or only warns when configured to
    with pytest.warns(UserWarning, match="at chance"):
        result = train_ppo(
            _config(max_steps=1, weak_reward_model="warn"),
            tiny_model_dir,
            rm_path,
            ROWS,
            tmp_path / "c",
            reward_model_eval_accuracy=0.5,
        )
    assert result.model_dir.is_dir()
    # and the measured accuracy of distinct responses is symmetric: swapping chosen and rejected gives 1 − acc
    models = load_ppo_models(_config(), tiny_model_dir, rm_path)
    pairs = [{"prompt": p, "chosen": f"Happy to help with: {p}", "rejected": "No."} for p in PROMPTS]
    swapped = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in pairs]
    accuracy = reward_model_accuracy(models.reward_model, tiny_tokenizer, pairs)
    assert accuracy + reward_model_accuracy(models.reward_model, tiny_tokenizer, swapped) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------------------


def test_separate_critic_warm_up_updates_only_the_critic(tiny_model_dir, tiny_tokenizer, reward_model, tmp_path):
    rm_path, accuracy = reward_model
    # Given a separate critic initialised from the reward model and one warm-up iteration
    config = _config(max_steps=1, critic="separate", value_warmup_iterations=1)
    models = load_ppo_models(config, tiny_model_dir, rm_path)
    critic_before = _state(models.actor_critic.critic)
    assert all(torch.equal(v, _state(models.reward_model)[k]) for k, v in critic_before.items())
    # so its value at the last token of a sequence starts as the RM's score of that sequence
    pairs = [encode_prompt_response(tiny_tokenizer, p, "Sure, let me check.") for p in PROMPTS[:3]]
    batch = collate_right_padded(pairs, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        _, values = models.actor_critic(batch["input_ids"], batch["attention_mask"])
        scores = score_sequences(models.reward_model, batch["input_ids"], batch["attention_mask"])
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(values[torch.arange(3), last], scores, atol=1e-5, rtol=0)
    logger = ListLogger()
    # When the warm-up iteration runs
    result = run_ppo(config, models, ROWS, tmp_path / "ppo", logger, reward_model_eval_accuracy=accuracy)
    # Then the critic learned and the policy did not move
    assert logger.series("ppo/critic_warmup") == [1.0]
    assert any(not torch.equal(v, critic_before[k]) for k, v in _state(models.actor_critic.critic).items())
    sft = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(v, sft[k]) for k, v in _weights(result.model_dir).items())
    # and the saved directory holds the policy (plain causal LM) and the critic beside it
    assert (result.model_dir / "critic" / "model.safetensors").is_file()


def test_lora_policy_uses_the_base_as_reference_and_adapts_beta(tiny_model_dir, reward_model, tmp_path):
    rm_path, accuracy = reward_model
    # Given LoRA adapters (no second copy of the model as reference) and an adaptive KL controller
    config = _config(max_steps=2, lora=LoRAConfig(r=4, alpha=8), target_kl=0.01, kl_horizon=8.0, eval_every=1)
    models = load_ppo_models(config, tiny_model_dir, rm_path)
    assert models.reference is None
    base_before = {k: v for k, v in _state(models.actor_critic.pretrained_model).items() if "lora_" not in k}
    logger = ListLogger()
    # When PPO runs
    result = run_ppo(
        config, models, ROWS, tmp_path / "ppo", logger, eval_prompt_rows=ROWS[:4], reward_model_eval_accuracy=accuracy
    )
    # Then held-out prompts were evaluated after each iteration (same seed each time), KL included
    assert len(logger.series("ppo/eval_score_mean")) == 2 and "ppo/eval_kl" in result.metrics
    assert all(math.isfinite(v) for v in logger.series("ppo/eval_kl") + logger.series("ppo/eval_score_mean"))
    # the first KL is 0 (adapters start at zero, reference = adapters disabled), so β shrank by the
    # controller's largest step: β₁ = β₀·(1 + clip(0/0.01 − 1, −0.2, 0.2)·8/8) = 0.2·0.8
    kl, beta = logger.series("ppo/kl"), logger.series("ppo/kl_coef")
    assert abs(kl[0]) < 1e-5
    assert beta == pytest.approx([0.2, 0.16], abs=1e-9)
    # the base weights are untouched and the saved policy has the adapters merged in
    after = _state(models.actor_critic.pretrained_model)
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    merged = _weights(result.model_dir)
    assert not any("lora_" in k for k in merged)
    assert any(
        not torch.equal(merged[k], v)
        for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()
    )


def test_ppo_starts_from_the_reward_trainers_model(tiny_model_dir, tmp_path):
    # Given a reward model saved by the reward-model stage, trained a few steps on text pairs
    pairs = [
        {"prompt": p, "chosen": "I'm sorry, let me fix that for you right away.", "rejected": "No."} for p in PROMPTS
    ]
    rm = train_reward_model(
        RewardConfig(max_steps=3, batch_size=4, learning_rate=1e-3, progress_bar=False),
        tiny_model_dir,
        pairs,
        pairs,
        tmp_path / "rm",
    )
    logger = ListLogger()
    # When PPO measures that RM's accuracy on held-out pairs itself and runs with the critic initialised from it
    result = train_ppo(
        _config(max_steps=1, critic="separate"),
        tiny_model_dir,
        rm.model_dir,
        ROWS,
        tmp_path / "ppo",
        logger,
        reward_model_eval_pairs=pairs,
    )
    # Then the accuracy it logged is the stage's own evaluation, and PPO ran
    assert logger.series("ppo/rm_eval_accuracy") == [pytest.approx(rm.metrics["rm/eval_accuracy"])]
    assert logger.series("ppo/rm_eval_accuracy")[0] >= 0.55
    assert result.model_dir.is_dir() and len(logger.series("ppo/score_mean")) == 1
