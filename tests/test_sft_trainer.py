"""SFT: prompt-masked next-token loss, packing without cross-contamination, accumulation, resume, NaN stop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers.interrupt import InterruptAt
from helpers.pickles import assert_no_pickles
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from rlhf_core.callbacks import ListLogger
from rlhf_core.tokenization import collate_right_padded
from rlhf_core.trainers.common import LoRAConfig, NonFiniteLossError, latest_checkpoint
from rlhf_core.trainers.sft import (
    SFTConfig,
    block_causal_mask,
    collate_packed,
    encode_demonstrations,
    sft_forward_sums,
    train_sft,
)

ISSUES = [
    "my parcel is late",
    "I was charged twice",
    "the app crashes",
    "I forgot my password",
    "the screen is cracked",
    "can I change my address",
]


def demonstrations(n: int, offset: int = 0) -> list[dict]:
    """Support-desk demonstrations with varied lengths (so padding and packing matter)."""
    rows = []
    for i in range(offset, offset + n):
        issue = ISSUES[i % len(ISSUES)]
        rows.append(
            {
                "prompt": f"Hello, {issue}. Order {i}." + " Please help." * (i % 3),
                "response": f"I am sorry that {issue}. I will fix order {i} for you today." + " Thank you." * (i % 2),
            }
        )
    return rows


def _config(**overrides) -> SFTConfig:
    base = {"max_steps": 12, "batch_size": 4, "learning_rate": 3e-3, "progress_bar": False, "seed": 0}
    return SFTConfig(**{**base, **overrides})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


def test_sft_loss_falls_and_final_model_is_saved(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given demonstrations (as a `datasets.Dataset`), when SFT runs 12 steps, then the training and held-out
    loss fall, every metric is reported and `output_dir/model` loads as a causal LM."""
    logger = ListLogger()
    train_rows = Dataset.from_list(demonstrations(24))
    result = train_sft(_config(eval_every=6), tiny_model_dir, train_rows, demonstrations(8, 100), tmp_path, logger)
    losses = logger.series("sft/loss")
    eval_losses = logger.series("sft/eval_loss")
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    assert len(eval_losses) == 2 and eval_losses[-1] < eval_losses[0] < losses[0]
    assert result.metrics["sft/eval_perplexity"] == pytest.approx(math.exp(result.metrics["sft/eval_loss"]))
    for name in ("sft/tokens_per_sec", "sft/peak_memory_mb", "sft/learning_rate", "sft/grad_norm"):
        assert result.metrics[name] > 0, name
    assert result.resumed_from_step is None
    assert result.model_dir == tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(result.model_dir)


def test_same_seed_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Determinism on CPU: two runs with one seed end bit-identical."""
    rows = demonstrations(8)
    a = train_sft(_config(max_steps=3, lora=LoRAConfig(r=2)), tiny_model_dir, rows, [], tmp_path / "a")
    b = train_sft(_config(max_steps=3, lora=LoRAConfig(r=2)), tiny_model_dir, rows, [], tmp_path / "b")
    assert_same_weights(a.model_dir, b.model_dir, atol=0.0)


def test_loss_covers_response_and_eos_but_not_prompt_or_padding(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Given a plain and a conversational demonstration (rendered through the chat template), the loss mask
    is exactly the assistant's tokens with the closing <|im_end|>, and the summed loss equals the cross-entropy
    over them written out by hand."""
    conversational = {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Where is it?"}],
        "response": [{"role": "assistant", "content": "On its way, sorry for the wait."}],
    }
    pairs = encode_demonstrations(tiny_tokenizer, [demonstrations(1)[0], conversational], _config())
    batch = collate_right_padded(pairs, tiny_tokenizer.pad_token_id)
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, pair in enumerate(pairs):
        masked_ids = batch["input_ids"][row][batch["response_mask"][row].bool()].tolist()
        assert masked_ids == pair.response_ids and masked_ids[-1] == eos
    prompt_text = tiny_tokenizer.decode(pairs[1].prompt_ids)
    assert prompt_text.startswith("<|im_start|>system\nBe kind.") and prompt_text.endswith("assistant\n")
    assert tiny_tokenizer.decode(pairs[1].response_ids) == "On its way, sorry for the wait.<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        loss_sum, sums = sft_forward_sums(model, batch)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
    expected = 0.0
    for row, pair in enumerate(pairs):
        start = len(pair.prompt_ids)
        for t in range(start, start + len(pair.response_ids)):
            expected -= logits[row, t - 1].log_softmax(-1)[batch["input_ids"][row, t]].item()
    assert sums["count"] == sum(len(p.response_ids) for p in pairs)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)


def test_packed_batch_gives_the_same_per_sample_loss_and_no_cross_attention(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Given 5 samples packed into rows, then (a) the summed loss equals the unpacked batch's, (b) each
    sample's logits equal its logits alone, and (c) changing one sample does not change its row-mate's
    logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs = encode_demonstrations(tiny_tokenizer, demonstrations(5), _config())
    pad = tiny_tokenizer.pad_token_id
    packed = collate_packed(pairs, pad, capacity=200)
    assert packed["input_ids"].shape[0] < len(pairs)  # really packed
    with torch.no_grad():
        packed_sum, packed_sums = sft_forward_sums(model, packed)
        unpacked_sum, unpacked_sums = sft_forward_sums(model, collate_right_padded(pairs, pad))
    assert packed_sums["count"] == unpacked_sums["count"]
    torch.testing.assert_close(packed_sum, unpacked_sum, atol=1e-4, rtol=1e-6)

    def row_logits(batch: dict) -> torch.Tensor:
        mask = block_causal_mask(batch["segment_ids"], torch.float32)
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits

    logits = row_logits(packed)
    first_len = len(pairs[0].prompt_ids) + len(pairs[0].response_ids)
    second_len = len(pairs[1].prompt_ids) + len(pairs[1].response_ids)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([pairs[1].prompt_ids + pairs[1].response_ids])).logits[0]
    torch.testing.assert_close(logits[0, first_len : first_len + second_len], alone, atol=1e-5, rtol=1e-5)

    poisoned = {k: v.clone() for k, v in packed.items()}
    poisoned["input_ids"][0, 1:first_len] = 5  # rewrite the first sample of row 0
    torch.testing.assert_close(row_logits(poisoned)[0, first_len:], logits[0, first_len:], atol=0, rtol=0)


def test_packing_follows_the_same_training_trajectory(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain, packed = ListLogger(), ListLogger()
    rows = demonstrations(16)
    train_sft(_config(max_steps=4), tiny_model_dir, rows, [], tmp_path / "plain", plain)
    train_sft(
        _config(max_steps=4, packing=True, pack_length=160),
        tiny_model_dir,
        rows,
        [],
        tmp_path / "packed",
        packed,
    )
    torch.testing.assert_close(packed.series("sft/loss"), plain.series("sft/loss"), atol=1e-5, rtol=0)
    assert_same_weights(tmp_path / "plain" / "model", tmp_path / "packed" / "model", atol=1e-5)


class GradientCapture:
    """Records the gradient every optimizer receives (a global step pre-hook), in parameter order."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads = [p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]]
        self.steps.append(grads)


def captured_gradients(run) -> list[list[torch.Tensor]]:
    capture = GradientCapture()
    handle = register_optimizer_step_pre_hook(capture)
    try:
        run()
    finally:
        handle.remove()
    return capture.steps


def test_one_by_eight_equals_eight_by_one_gradient_accumulation(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One step over 8 rows, as 1 micro-batch of 8 or as 8 micro-batches of 1, hands the optimizer the same
    gradient: the loss is a token mean over the whole global batch either way (rows differ in token count).

    (Weights are not compared: Adam's first update is ≈ lr·sign(g), so a coordinate with g ≈ 0 turns float
    rounding into a full ±lr step.)"""
    rows = demonstrations(8)
    one = _config(max_steps=1, batch_size=8, grad_accum_steps=1)
    eight = _config(max_steps=1, batch_size=1, grad_accum_steps=8)
    results = {}
    grads_one = captured_gradients(lambda: results.update(a=train_sft(one, tiny_model_dir, rows, [], tmp_path / "a")))
    grads_eight = captured_gradients(
        lambda: results.update(b=train_sft(eight, tiny_model_dir, rows, [], tmp_path / "b"))
    )
    assert len(grads_one) == len(grads_eight) == 1
    for step_one, step_eight in zip(grads_one, grads_eight, strict=True):
        for g1, g8 in zip(step_one, step_eight, strict=True):
            torch.testing.assert_close(g8, g1, atol=1e-6, rtol=1e-5)
    assert results["a"].metrics["sft/loss"] == pytest.approx(results["b"].metrics["sft/loss"], abs=1e-6)


def test_kill_and_resume_ends_with_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given a run killed after step 5 (checkpoints every 2, LoRA off, warm-up + decay so the scheduler state
    matters), when `train_sft` is called again on the same dir, then it resumes from step 4 and ends with the
    weights and final metrics of an uninterrupted run."""
    config = _config(max_steps=8, checkpoint_every=2, warmup_steps=2, lr_schedule="cosine")
    rows, held_out = demonstrations(10), demonstrations(4, 50)
    straight = train_sft(config, tiny_model_dir, rows, held_out, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train_sft(config, tiny_model_dir, rows, held_out, tmp_path / "resumed", InterruptAt(5))
    assert not (tmp_path / "resumed" / "model").exists()
    assert latest_checkpoint(tmp_path / "resumed").name == "step-4"
    resumed = train_sft(config, tiny_model_dir, rows, held_out, tmp_path / "resumed")
    assert resumed.resumed_from_step == 4
    assert_same_weights(straight.model_dir, resumed.model_dir)
    assert resumed.metrics["sft/eval_loss"] == pytest.approx(straight.metrics["sft/eval_loss"], abs=1e-6)
    assert_no_pickles(tmp_path / "straight")
    assert_no_pickles(tmp_path / "resumed")


SLOW_RUN = """
import json, sys, time
from rlhf_core.trainers.sft import SFTConfig, train_sft

class Slow:  # ~0.3 s per step, so the parent can kill it mid-run
    def log_metrics(self, metrics, step):
        time.sleep(0.3)

spec = json.loads(sys.argv[1])
train_sft(SFTConfig(**spec["config"]), spec["model"], spec["rows"], [], spec["out"], Slow())
"""


def test_a_killed_process_resumes_to_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given a real training process SIGKILLed after its 3rd checkpoint (possibly mid-write), when
    `train_sft` runs again on its directory, then it resumes from a complete checkpoint and ends with the
    weights of an uninterrupted run."""
    kwargs = {**_config().__dict__, "max_steps": 10, "checkpoint_every": 1, "keep_checkpoints": 2}
    del kwargs["lora"]
    config, rows = SFTConfig(**kwargs), demonstrations(12)
    out = tmp_path / "killed"
    spec = json.dumps({"config": kwargs, "model": str(tiny_model_dir), "rows": rows, "out": str(out)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUN, spec], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(out) is None or latest_checkpoint(out).name in ("step-1", "step-2"):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (out / "model").exists()
    resumed = train_sft(config, tiny_model_dir, rows, [], out)
    straight = train_sft(config, tiny_model_dir, rows, [], tmp_path / "straight")
    assert resumed.resumed_from_step is not None and 3 <= resumed.resumed_from_step < 10
    assert_same_weights(straight.model_dir, resumed.model_dir)


def test_lora_sft_learns_and_saves_a_merged_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    logger = ListLogger()
    result = train_sft(
        _config(max_steps=6, learning_rate=1e-2, lora=LoRAConfig(r=4)),
        tiny_model_dir,
        demonstrations(16),
        [],
        tmp_path,
        logger,
    )
    losses = logger.series("sft/loss")
    assert losses[-1] < losses[0]
    trained, base = _weights(result.model_dir), _weights(tiny_model_dir)
    assert not any("lora" in name for name in trained)
    # LoRA was applied, checked against the base's own file: only the adapted projections moved (merged into
    # them); embeddings and norms, which no adapter touches, are bit-identical. Full fine-tuning moves them all.
    untouched = [n for n in base if "embed_tokens" in n or "norm" in n]
    adapted = [n for n in base if n.endswith("q_proj.weight")]
    assert untouched and adapted
    assert all(torch.equal(trained[n], base[n]) for n in untouched)
    assert all(not torch.equal(trained[n], base[n]) for n in adapted)


class PoisonEmbeddingsAfter:
    """Fault injection: once step `step` has been logged, every embedding output becomes nan."""

    def __init__(self, step: int) -> None:
        self.step, self.armed = step, False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.armed = self.armed or step >= self.step

    def hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.armed and isinstance(module, torch.nn.Embedding):
            return output * math.nan
        return None


def test_nan_loss_stops_with_the_last_good_checkpoint_loadable(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Given activations that turn nan after step 3 (checkpoints every 2), when training, then it stops with
    NonFiniteLossError at step 3 naming checkpoint step-2, no final model is written, and a rerun without the
    fault resumes from step-2 and completes."""
    poison = PoisonEmbeddingsAfter(3)
    handle = torch.nn.modules.module.register_module_forward_hook(poison.hook)
    try:
        with pytest.raises(NonFiniteLossError) as error:
            train_sft(
                _config(max_steps=6, checkpoint_every=2),
                tiny_model_dir,
                demonstrations(8),
                [],
                tmp_path,
                poison,
            )
    finally:
        handle.remove()
    assert error.value.step == 3
    assert error.value.last_checkpoint == tmp_path / "checkpoints" / "step-2"
    assert not (tmp_path / "model").exists()
    checkpoint_weights = load_file(str(error.value.last_checkpoint / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in checkpoint_weights.values())
    result = train_sft(_config(max_steps=6, checkpoint_every=2), tiny_model_dir, demonstrations(8), [], tmp_path)
    assert result.resumed_from_step == 2 and math.isfinite(result.metrics["sft/loss"])
