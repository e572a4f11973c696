"""The shared trainer machinery: configs, data order, schedules, checkpoints, the non-finite guard, LoRA's
reference, the atomic final save and the meters."""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_core.callbacks import ListLogger
from rlhf_core.trainers.common import (
    DataPosition,
    EpochPermutationSampler,
    LoRAConfig,
    NonFiniteLossError,
    ThroughputMeter,
    TrainerConfig,
    TrainState,
    apply_lora,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    lr_factor,
    make_accelerator,
    optimizer_step,
    peak_memory_mb,
    reference_model,
    save_checkpoint,
    save_final_model,
    shard_global_batch,
    start_session,
    supported_mixed_precision,
)


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"grad_accum_steps": 0},
        {"max_steps": 0},
        {"learning_rate": 0.0},
        {"learning_rate": math.inf},
        {"max_grad_norm": 0.0},
        {"mixed_precision": "fp8"},
        {"lr_schedule": "step"},
        {"checkpoint_every": -1},
    ],
)
def test_config_rejects_invalid_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainerConfig(**bad)


def test_lora_config_rejects_invalid_values() -> None:
    with pytest.raises(ValueError):
        LoRAConfig(r=0)
    with pytest.raises(ValueError):
        LoRAConfig(target_modules=())


def test_config_is_frozen() -> None:
    config = TrainerConfig()
    with pytest.raises(AttributeError):
        config.max_steps = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------------------
# Data order
# ------------------------------------------------------------------------------------------------------------


def test_sampler_stream_is_the_concatenation_of_seeded_epoch_permutations() -> None:
    """Given 5 rows, when 12 indices are taken, then they are epoch 0's permutation, epoch 1's, then the first
    2 of epoch 2's, each epoch a permutation of range(5) and the position (2, 2)."""
    sampler = EpochPermutationSampler(5, seed=3)
    indices, position = sampler.take(DataPosition(), 12)
    expected = sampler.permutation(0) + sampler.permutation(1) + sampler.permutation(2)[:2]
    assert indices == expected
    assert position == DataPosition(epoch=2, index=2)
    for epoch in range(3):
        assert sorted(sampler.permutation(epoch)) == list(range(5))
    assert sampler.permutation(0) != sampler.permutation(1)


def test_sampler_resumes_from_a_position() -> None:
    """Taking 4 then 7 gives exactly the first 11 of the stream: a saved position restores the data order."""
    sampler = EpochPermutationSampler(6, seed=0)
    first, position = sampler.take(DataPosition(), 4)
    second, _ = EpochPermutationSampler(6, seed=0).take(position, 7)
    whole, _ = sampler.take(DataPosition(), 11)
    assert first + second == whole


def test_shard_global_batch_layout() -> None:
    """[grad_accum, processes, batch] layout: every index lands in exactly one micro-batch of one process."""
    indices = list(range(12))
    shards = [shard_global_batch(indices, 2, 3, 2, p) for p in range(2)]
    assert shards[0] == [[0, 1], [4, 5], [8, 9]]
    assert shards[1] == [[2, 3], [6, 7], [10, 11]]
    with pytest.raises(ValueError):
        shard_global_batch(indices, 2, 2, 2, 0)


def test_lr_schedules() -> None:
    """Warm-up (step+1)/W, then constant 1, linear 1 − p or cosine ½(1 + cos πp), p = (step − W)/(N − W)."""
    warm = TrainerConfig(max_steps=10, warmup_steps=4, lr_schedule="linear")
    assert [lr_factor(s, warm) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(7, warm) == pytest.approx(1 - 3 / 6)
    cosine = TrainerConfig(max_steps=10, warmup_steps=0, lr_schedule="cosine")
    assert lr_factor(5, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, TrainerConfig(max_steps=10)) == 1.0


# ------------------------------------------------------------------------------------------------------------
# Accelerator, checkpoints, the non-finite guard
# ------------------------------------------------------------------------------------------------------------


def test_fp16_falls_back_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is supported")
    assert supported_mixed_precision("fp16") == "no"
    accelerator = make_accelerator(TrainerConfig(mixed_precision="fp16", grad_accum_steps=3))
    assert accelerator.mixed_precision == "no"
    assert accelerator.gradient_accumulation_steps == 3


def _linear_session(tmp_path: Path, **overrides) -> tuple:
    torch.manual_seed(0)
    config = TrainerConfig(max_steps=10, batch_size=1, learning_rate=0.1, **overrides)
    model = torch.nn.Linear(3, 1)
    session = start_session(config, make_accelerator(config), model, tmp_path, ListLogger())
    return session, model


def _sgd_step(session, x: torch.Tensor) -> dict[str, float]:
    loss = session.model(x).pow(2).sum()
    session.accelerator.backward(loss)
    return optimizer_step(session)


def test_checkpoint_restores_weights_optimizer_scheduler_rng_and_position(tmp_path: Path) -> None:
    """Given a session checkpointed at step 2, when a fresh session starts in the same dir, then it resumes at
    step 2 with the same weights, AdamW moments, schedule and RNG stream, and its next step matches."""
    session, _ = _linear_session(tmp_path, warmup_steps=5)
    x = torch.ones(1, 3)
    _sgd_step(session, x)
    _sgd_step(session, x)
    session.state.position = DataPosition(epoch=1, index=3)
    session.state.extra["kl_coef"] = 0.05
    path = save_checkpoint(session, keep=2)
    assert path == checkpoint_dir(tmp_path, 2) and latest_checkpoint(tmp_path) == path
    expected_next = _sgd_step(session, x)
    expected_weight = session.unwrapped.weight.detach().clone()
    expected_draw = torch.rand(3)
    torch.rand(100)  # a different RNG state before resuming

    resumed, _ = _linear_session(tmp_path, warmup_steps=5)
    assert resumed.resumed_from_step == 2
    assert resumed.state.position == DataPosition(epoch=1, index=3)
    assert resumed.state.extra == {"kl_coef": 0.05}
    draw_after_resume = torch.rand(3)
    assert _sgd_step(resumed, x) == expected_next
    assert torch.equal(resumed.unwrapped.weight, expected_weight)
    assert torch.equal(draw_after_resume, expected_draw)


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path) -> None:
    """A leftover temporary dir (a crash mid-write) is never taken for a checkpoint; `keep` newest stay."""
    session, _ = _linear_session(tmp_path)
    for step in (1, 2, 3):
        session.state.step = step
        save_checkpoint(session, keep=2)
    crashed = tmp_path / "checkpoints" / ".tmp-step-4"
    crashed.mkdir()
    without_manifest = tmp_path / "checkpoints" / "step-5"  # e.g. the format before manifests
    without_manifest.mkdir()
    (without_manifest / "trainer_state.json").write_text(session.state.to_json())
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".tmp-step-4", "step-2", "step-3", "step-5"]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 3)
    assert load_checkpoint(session, checkpoint_dir(tmp_path, 3)).step == 3
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_resume_reads_no_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a checkpoint, then it holds no pickle file, and resuming from it never unpickles anything (a
    replaced pickle in a checkpoint would run code on resume)."""
    session, _ = _linear_session(tmp_path, warmup_steps=5)
    _sgd_step(session, torch.ones(1, 3))
    path = save_checkpoint(session, keep=2)
    assert not [p.name for p in path.iterdir() if p.suffix in (".pkl", ".pt", ".bin", ".pth")]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    resumed, _ = _linear_session(tmp_path, warmup_steps=5)
    assert resumed.resumed_from_step == 1


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Given checkpoints at steps 1 and 2 whose newest lost half of `model.safetensors` (a crash or a full
    disk), when a session starts, then it warns and resumes from step 1 with step 1's weights."""
    session, _ = _linear_session(tmp_path)
    _sgd_step(session, torch.ones(1, 3))
    save_checkpoint(session, keep=2)
    weight_at_1 = session.unwrapped.weight.detach().clone()
    _sgd_step(session, torch.ones(1, 3))
    newest = save_checkpoint(session, keep=2)
    _truncate(newest / "model.safetensors")

    with caplog.at_level(logging.WARNING):
        resumed, _ = _linear_session(tmp_path)
    assert resumed.resumed_from_step == 1
    assert torch.equal(resumed.unwrapped.weight, weight_at_1)
    assert "step-2" in caplog.text and "model.safetensors" in caplog.text
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)


def test_a_corrupted_checkpoint_is_caught_by_its_hash_on_resume(tmp_path: Path) -> None:
    """A flipped byte keeps the size: the quick check (sizes) takes the checkpoint, the resume check (sha256)
    rejects it and falls back."""
    session, _ = _linear_session(tmp_path)
    for _ in range(2):
        _sgd_step(session, torch.ones(1, 3))
        newest = save_checkpoint(session, keep=2)
    target = newest / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path) == newest
    assert latest_checkpoint(tmp_path, verify_hashes=True) == checkpoint_dir(tmp_path, 1)
    assert _linear_session(tmp_path)[0].resumed_from_step == 1


def test_non_finite_gradient_raises_before_the_update(tmp_path: Path) -> None:
    """Given a nan gradient, when the optimizer steps, then NonFiniteLossError names the last good checkpoint
    and the weights are untouched."""
    session, _ = _linear_session(tmp_path, checkpoint_every=1)
    _sgd_step(session, torch.ones(1, 3))
    good = save_checkpoint(session, keep=2)
    before = session.unwrapped.weight.detach().clone()
    session.accelerator.backward(session.model(torch.full((1, 3), math.nan)).sum())
    with pytest.raises(NonFiniteLossError) as error:
        optimizer_step(session)
    assert error.value.last_checkpoint == good and error.value.step == 1
    assert torch.equal(session.unwrapped.weight, before)


# ------------------------------------------------------------------------------------------------------------
# LoRA and the reference
# ------------------------------------------------------------------------------------------------------------


def test_lora_reference_is_the_base_model_with_adapters_disabled(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given a LoRA policy trained a few steps, when run inside `reference_model`, then it computes exactly
    the original model's logits, its base weights are bit-identical to the original, and only the adapters
    changed; outside the context the policy differs and is back in train mode."""
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    config = TrainerConfig(max_steps=3, batch_size=1, learning_rate=1e-2, lora=LoRAConfig(r=4))
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), config.lora)
    session = start_session(config, make_accelerator(config), policy, tmp_path)
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    for _ in range(3):
        session.model.train()
        session.accelerator.backward(-session.model(input_ids=ids).logits.log_softmax(-1)[..., 7].mean())
        optimizer_step(session)

    with torch.no_grad():
        expected = original(input_ids=ids).logits
    with reference_model(session.model) as ref:
        assert not ref.training
        reference_logits = ref(input_ids=ids).logits
    assert torch.equal(reference_logits, expected)
    assert session.unwrapped.training
    with torch.no_grad():
        assert not torch.allclose(session.unwrapped(input_ids=ids).logits, expected)
    base = dict(original.named_parameters())
    for name, param in session.unwrapped.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name.replace(".base_layer", "")]), name
            assert not param.requires_grad


def test_reference_without_lora_needs_a_reference_model(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError), reference_model(model):
        pass
    with reference_model(model, ref_model=model) as ref:
        assert ref is model and not torch.is_grad_enabled()


# ------------------------------------------------------------------------------------------------------------
# Final save, meters
# ------------------------------------------------------------------------------------------------------------


class _FailingTokenizer:
    """Fails while the final model is being written, like a full disk would."""

    def save_pretrained(self, path: Path) -> None:
        raise OSError("disk full")


def test_final_model_dir_exists_only_when_complete(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given a save that fails half-way, then `model/` does not exist; a later complete save replaces the
    leftover and contains weights, config and tokenizer."""
    from transformers import AutoTokenizer

    accelerator = make_accelerator(TrainerConfig())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(OSError):
        save_final_model(accelerator, model, _FailingTokenizer(), tmp_path)
    assert not (tmp_path / "model").exists()
    path = save_final_model(accelerator, model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path)
    assert path == tmp_path / "model"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert not (tmp_path / ".tmp-model").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_throughput_and_memory_meters() -> None:
    meter = ThroughputMeter()
    meter.update(1000)
    rate = meter.rate()
    assert rate > 0
    assert meter.rate() == 0.0  # the window was reset
    assert peak_memory_mb() > 1.0


def test_train_state_round_trips_through_json() -> None:
    state = TrainState(step=7, position=DataPosition(2, 5), extra={"a": [1, 2]})
    assert TrainState.from_json(state.to_json()) == state


def test_without_a_terminal_the_progress_bar_is_a_plain_line_every_tenth_of_the_steps() -> None:
    import io

    from rlhf_core.trainers.common import PlainProgress, progress_bar

    out = io.StringIO()
    bar = PlainProgress(total=25, initial=0, desc="sft", stream=out)
    for step in range(1, 26):
        bar.set_postfix({"loss": f"{1 / step:.4f}"})  # as the trainers do: the step's metric, then the step
        bar.update(1)
    bar.close()

    lines = out.getvalue().splitlines()
    # A stride of 3 steps (a tenth of 25, rounded up): steps 3, 6, …, 24, then the last step on close.
    assert [line.split(",")[0] for line in lines] == [
        f"sft: step {n}/25 ({100 * n / 25:.0f}%)" for n in (*range(3, 25, 3), 25)
    ]
    assert "loss=0.3333" in lines[0] and "about" in lines[0] and " s left" in lines[0]
    assert "loss=0.0400" in lines[-1] and "left" not in lines[-1]
    # Pytest's captured stderr is no terminal: an enabled bar is the plain one, a disabled one stays silent.
    assert isinstance(progress_bar(10, 0, "dpo", True), PlainProgress)
    assert progress_bar(10, 0, "dpo", False).disable
