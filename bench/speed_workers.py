"""One measured training run per process, for `bench/speed.py`.

    python bench/speed_workers.py SPEC.json RESULT.json

SPEC names a runner (`ours_sft`, `trl_sft`, `ours_rm`, `trl_rm`, `ours_dpo`, `trl_dpo`, `ours_ppo`, `trl_ppo`,
`ours_ppo_rloo_shape`, `trl_rloo`) and the shared settings (model, rows, batch shapes, steps). Each runner
trains for `steps` optimizer steps (PPO/RLOO: iterations) with full fine-tuning in float32 and records the wall
clock at the end of every step:

- ours: a `MetricLogger` that timestamps every training-step log (`log_every=1`);
- TRL: a `TrainerCallback.on_step_end`.

Throughput is measured over steps 2..N (step 1 pays one-off costs: lazy kernels, allocator warm-up, TRL's
dataloader start), `units(steps 2..N) / (t_N − t_1)`; units are non-padding tokens for SFT (ours: replayed
from the trainer's own seeded sampler; TRL: its logged `num_tokens`), pairs for RM/DPO (the global batch),
episodes (sampled responses) for PPO/RLOO. Peak memory is the process's peak RSS (`getrusage`) on CPU, or
`torch.cuda.max_memory_allocated` on CUDA: one process per run, so the peaks of two runs never mix.
The whole `train_*` call / TRL trainer construction + `train()` is timed too (`wall_s`).

Runs with the interpreter of `bench/.venv-trl` (TRL 1.16) or `bench/.venv-trl-ppo` (TRL 1.12, the last release
with `PPOTrainer`), both with this repository installed (`pip install -e . --no-deps`), so ours and TRL's run
with the same torch, transformers and accelerate.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb() -> float:
    """Peak CUDA allocation when a GPU was used, else the process's peak resident set size (MiB)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Timestamps (perf_counter) of step ends, plus per-step units; the throughput of steps 2..N."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.units: list[float] = []

    def tick(self, units: float) -> None:
        self.times.append(time.perf_counter())
        self.units.append(float(units))

    def rate(self) -> float:
        if len(self.times) < 2:
            raise RuntimeError(f"need at least 2 timed steps, got {len(self.times)}")
        return sum(self.units[1:]) / (self.times[-1] - self.times[0])

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


class ClockLogger:
    """Our trainers' `MetricLogger`: timestamps each training-step log (the one carrying `<stage>/peak_memory_mb`,
    which evaluation logs lack) and keeps every record."""

    def __init__(self, stage: str, units_of_step: Any) -> None:
        self.stage, self.units_of_step = stage, units_of_step
        self.clock = StepClock()
        self.records: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if f"{self.stage}/peak_memory_mb" in metrics:
            self.clock.tick(self.units_of_step(step, metrics))
        self.records.append((step, dict(metrics)))


def _trl_clock_callback(clock: StepClock, units_of_step: Any, logs_out: list[dict]) -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            clock.tick(units_of_step(state))

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            logs_out.append({"step": state.global_step, **(logs or {})})

    return Clock()


# --------------------------------------------------------------------------------------------------------------
# Data in TRL's formats (conversational, explicit prompt)
# --------------------------------------------------------------------------------------------------------------


def _messages(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _assistant(response: Any) -> list[dict]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def _trl_common_args(spec: dict, out: Path) -> dict:
    """TrainingArguments shared by TRL's SFT/RM/DPO runs: the same shapes and schedule as ours (constant lr, no
    warm-up, grad clip 1.0, float32 or, with `spec["bf16"]`, bf16 autocast like ours), no saving/eval/reporting.
    The optimizer is TRL's default (transformers picks the fused AdamW kernel with torch >= 2.8). TRL 1.x defaults
    gradient checkpointing and bf16 to on; both follow the spec so both sides do the same arithmetic."""
    return {
        "output_dir": str(out),
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["learning_rate"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "seed": spec["seed"],
        "bf16": bool(spec.get("bf16")),
        # transformers refuses bf16 without a GPU unless told the run is on CPU on purpose
        "use_cpu": bool(spec.get("bf16")) and not torch.cuda.is_available(),
        "fp16": False,
        "gradient_checkpointing": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": spec["max_length"],
    }


# --------------------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------------------


def ours_sft(spec: dict, out: Path) -> dict:
    from transformers import AutoTokenizer

    from rlhf_core.trainers.common import DataPosition, EpochPermutationSampler
    from rlhf_core.trainers.sft import SFTConfig, encode_demonstrations, train_sft

    config = SFTConfig(
        seed=spec["seed"],
        mixed_precision="bf16" if spec.get("bf16") else "no",
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        max_prompt_len=None,
        max_response_len=None,
        progress_bar=False,
    )
    rows = spec["sft_rows"]
    # Replay the trainer's own data order to count each step's non-padding tokens exactly.
    pairs = encode_demonstrations(AutoTokenizer.from_pretrained(spec["model_path"]), rows, config)
    sampler, position, per_step = EpochPermutationSampler(len(rows), config.seed), DataPosition(), []
    for _ in range(config.max_steps):
        indices, position = sampler.take(position, config.batch_size)
        per_step.append(sum(len(pairs[i].prompt_ids) + len(pairs[i].response_ids) for i in indices))
    logger = ClockLogger("sft", lambda step, m: per_step[step - 1])
    start = time.perf_counter()
    train_sft(config, spec["model_path"], rows, [], out, logger)
    wall = time.perf_counter() - start
    return {"rate": logger.clock.rate(), "wall_s": wall, "step_s": logger.clock.step_seconds(), "tokens": sum(per_step)}


def trl_sft(spec: dict, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    data = Dataset.from_list(
        [{"prompt": _messages(r["prompt"]), "completion": _assistant(r["response"])} for r in spec["sft_rows"]]
    )
    clock, logs = StepClock(), []
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    args = SFTConfig(**_trl_common_args(spec, out), packing=False, padding_free=False)
    # Tokens of a step = the increase of TRL's own `num_tokens` (Σ attention_mask) logged at that step.
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[_trl_clock_callback(clock, lambda state: 0.0, logs)],
    )
    trainer.train()
    wall = time.perf_counter() - start
    cumulative = [entry["num_tokens"] for entry in logs if "num_tokens" in entry]
    clock.units = [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]
    return {"rate": clock.rate(), "wall_s": wall, "step_s": clock.step_seconds(), "tokens": cumulative[-1]}


# --------------------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------------------


def ours_rm(spec: dict, out: Path) -> dict:
    from rlhf_core.trainers.reward import RewardConfig, train_reward_model

    config = RewardConfig(
        seed=spec["seed"],
        mixed_precision="bf16" if spec.get("bf16") else "no",
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        max_prompt_len=None,
        max_response_len=None,
        progress_bar=False,
    )
    logger = ClockLogger("rm", lambda step, m: config.batch_size)
    start = time.perf_counter()
    train_reward_model(config, spec["model_path"], spec["pref_rows"], [], out, logger)
    wall = time.perf_counter() - start
    return {"rate": logger.clock.rate(), "wall_s": wall, "step_s": logger.clock.step_seconds()}


def trl_rm(spec: dict, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    data = Dataset.from_list(
        [
            {"prompt": _messages(r["prompt"]), "chosen": _assistant(r["chosen"]), "rejected": _assistant(r["rejected"])}
            for r in spec["pref_rows"]
        ]
    )
    clock, logs = StepClock(), []
    start = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_path"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    args = RewardConfig(**_trl_common_args(spec, out))
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[_trl_clock_callback(clock, lambda state: spec["batch_size"], logs)],
    )
    trainer.train()
    wall = time.perf_counter() - start
    return {"rate": clock.rate(), "wall_s": wall, "step_s": clock.step_seconds()}


# --------------------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------------------


def ours_dpo(spec: dict, out: Path) -> dict:
    from rlhf_core.trainers.dpo import DPOConfig, train_dpo

    config = DPOConfig(
        seed=spec["seed"],
        mixed_precision="bf16" if spec.get("bf16") else "no",
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        dpo_beta=0.1,
        max_prompt_len=None,
        max_response_len=None,
        progress_bar=False,
    )
    logger = ClockLogger("dpo", lambda step, m: config.batch_size)
    start = time.perf_counter()
    train_dpo(config, spec["model_path"], spec["pref_rows"], [], out, logger)
    wall = time.perf_counter() - start
    return {"rate": logger.clock.rate(), "wall_s": wall, "step_s": logger.clock.step_seconds()}


def trl_dpo(spec: dict, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    data = Dataset.from_list(
        [
            {"prompt": _messages(r["prompt"]), "chosen": _assistant(r["chosen"]), "rejected": _assistant(r["rejected"])}
            for r in spec["pref_rows"]
        ]
    )
    clock, logs = StepClock(), []
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    # Ours always computes the reference log-probs in one pass before training and frees its frozen copy. TRL's
    # default recomputes them with a live reference model at every step; with `trl_precompute_ref` it does what
    # ours does (one pass in the trainer's constructor, from the initial policy: no reference model kept).
    precompute = bool(spec.get("trl_precompute_ref", False))
    ref = None if precompute else AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    args = DPOConfig(**_trl_common_args(spec, out), beta=0.1, precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[_trl_clock_callback(clock, lambda state: spec["batch_size"], logs)],
    )
    trainer.train()
    wall = time.perf_counter() - start
    return {"rate": clock.rate(), "wall_s": wall, "step_s": clock.step_seconds()}


# --------------------------------------------------------------------------------------------------------------
# PPO (ours vs TRL 1.12 PPOTrainer) and the RLOO-shaped run (ours vs TRL 1.16 RLOOTrainer)
# --------------------------------------------------------------------------------------------------------------


class GenerationLengths:
    """Wraps a generation function to record the decode steps of each call (`[batch, T]` width of the sampled
    responses): sampling cost grows with it, so both sides' widths are reported beside episodes/s."""

    def __init__(self) -> None:
        self.widths: list[int] = []

    def mean(self) -> float:
        return sum(self.widths) / max(len(self.widths), 1)


def ours_ppo(spec: dict, out: Path) -> dict:
    import rlhf_core.experience as experience
    from rlhf_core.trainers.ppo import PPOConfig, train_ppo

    lengths, inner = GenerationLengths(), experience.generate

    def recording_generate(*args: Any, **kwargs: Any) -> Any:
        rollout = inner(*args, **kwargs)
        lengths.widths.append(int(rollout.response_ids.shape[1]))
        return rollout

    experience.generate = recording_generate
    rollout, micro = spec["rollout_batch_size"], spec["batch_size"]
    config = PPOConfig(
        seed=spec["seed"],
        max_steps=spec["steps"],
        batch_size=micro,
        grad_accum_steps=rollout // micro,
        rollout_batch_size=rollout,
        ppo_epochs=spec["ppo_epochs"],
        learning_rate=spec["learning_rate"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=1.0,
        kl_coef=0.05,
        critic=spec["critic"],
        mixed_precision="bf16" if spec.get("bf16") else "no",
        max_prompt_len=None,
        weak_reward_model="warn",
        min_reward_model_accuracy=0.0,
        progress_bar=False,
        dead_signal="warn",  # speed, not learning: the tiny random model never ends its answers
    )
    logger = ClockLogger("ppo", lambda step, m: rollout)
    start = time.perf_counter()
    train_ppo(
        config, spec["model_path"], spec["rm_path"], spec["prompt_rows"], out, logger, reward_model_eval_accuracy=1.0
    )
    wall = time.perf_counter() - start
    mean_len = [m["ppo/response_length"] for _, m in logger.records if "ppo/response_length" in m]
    # The trainer's own per-iteration split (perf_counter around each part), iterations 2..N like the rate.
    split = {
        part: [m[f"ppo/time_{part}_s"] for _, m in logger.records if f"ppo/time_{part}_s" in m][1:]
        for part in ("generation", "scoring", "update")
    }
    return {
        "rate": logger.clock.rate(),
        "wall_s": wall,
        "step_s": logger.clock.step_seconds(),
        "decode_steps": lengths.mean(),
        "response_length": sum(mean_len) / max(len(mean_len), 1),
        "split_s": split,
    }


def _prompt_ids(tokenizer: Any, rows: list[dict]) -> list[list[int]]:
    from rlhf_core.tokenization import encode_prompt

    return [encode_prompt(tokenizer, r["prompt"]) for r in rows]


def trl_ppo(spec: dict, out: Path) -> dict:
    """TRL 1.12's `trl.experimental.ppo.PPOTrainer`: policy, reference, reward model and a separate value model
    (initialised from the reward model, like ours with `critic="separate"`). Rollout R = per_device ×
    grad_accum, one minibatch (num_mini_batches=1) of micro-batches `batch_size`: one optimizer step per PPO
    epoch, as ours with `grad_accum_steps = R / batch_size`."""
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    lengths, inner = GenerationLengths(), ppo_module.batch_generation

    def recording_generation(model: Any, queries: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        query_responses, logits = inner(model, queries, *args, **kwargs)
        lengths.widths.append(int(query_responses.shape[1] - queries.shape[1]))
        return query_responses, logits

    ppo_module.batch_generation = recording_generation
    # Time split per iteration: generation = batch_generation; scoring = the reference / value / reward forwards
    # of the rollout (the module's `forward` and `get_reward` while grad is off); update = the rest.
    per_iteration: list[dict[str, float]] = []
    timed_generation = ppo_module.batch_generation

    def generation_clock(*args: Any, **kwargs: Any) -> Any:
        per_iteration.append({"generation": 0.0, "scoring": 0.0})
        start = time.perf_counter()
        result = timed_generation(*args, **kwargs)
        per_iteration[-1]["generation"] += time.perf_counter() - start
        return result

    def scoring_clock(inner_fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = inner_fn(*args, **kwargs)
            if per_iteration and not torch.is_grad_enabled():
                per_iteration[-1]["scoring"] += time.perf_counter() - start
            return result

        return wrapped

    ppo_module.batch_generation = generation_clock
    ppo_module.forward = scoring_clock(ppo_module.forward)
    ppo_module.get_reward = scoring_clock(ppo_module.get_reward)
    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    tokenizer.padding_side = "left"
    rollout, micro = spec["rollout_batch_size"], spec["batch_size"]
    data = Dataset.from_list([{"input_ids": ids} for ids in _prompt_ids(tokenizer, spec["prompt_rows"])])
    clock, logs = StepClock(), []
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_path"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["rm_path"], num_labels=1, dtype=torch.float32)
    args = PPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rollout // micro,
        num_mini_batches=1,
        num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=rollout * spec["steps"],
        local_rollout_forward_batch_size=rollout,
        response_length=spec["max_new_tokens"],
        stop_token="eos",
        temperature=1.0,
        kl_coef=0.05,
        missing_eos_penalty=1.0,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=spec["seed"],
        bf16=bool(spec.get("bf16")),
        use_cpu=bool(spec.get("bf16")) and not torch.cuda.is_available(),
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        max_grad_norm=1.0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=data,
        eval_dataset=data.select(range(min(len(data), 4))),
        callbacks=[_trl_clock_callback(clock, lambda state: rollout, logs)],
    )
    trainer.train()
    wall = time.perf_counter() - start
    steps = clock.step_seconds()  # iterations 2..N, each from the previous iteration's end to its own
    split = {part: [it[part] for it in per_iteration[1:]] for part in ("generation", "scoring")}
    split["update"] = [t - g - s for t, g, s in zip(steps, split["generation"], split["scoring"], strict=False)]
    return {
        "rate": clock.rate(),
        "wall_s": wall,
        "step_s": steps,
        "decode_steps": lengths.mean(),
        "split_s": split,
    }


def trl_rloo(spec: dict, out: Path) -> dict:
    """TRL 1.16's `RLOOTrainer`: per iteration R completions (R / k prompts × k samples), one optimizer step over
    them (micro-batches of `batch_size`), reward = the reward model, β = 0.05."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    rollout, micro, k = spec["rollout_batch_size"], spec["batch_size"], spec["rloo_k"]
    data = Dataset.from_list([{"prompt": _messages(r["prompt"])} for r in spec["prompt_rows"]])
    clock, logs = StepClock(), []
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_path"], num_labels=1, dtype=torch.float32)
    reward_tokenizer = AutoTokenizer.from_pretrained(spec["rm_path"])
    args = RLOOConfig(
        output_dir=str(out),
        max_steps=spec["steps"],
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rollout // micro,
        steps_per_generation=rollout // micro,
        num_generations=k,
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        beta=0.05,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=spec["seed"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        max_grad_norm=1.0,
        log_completions=False,
    )
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
        callbacks=[_trl_clock_callback(clock, lambda state: rollout, logs)],
    )
    trainer.train()
    wall = time.perf_counter() - start
    mean_len = [e["completions/mean_length"] for e in logs if "completions/mean_length" in e]
    return {
        "rate": clock.rate(),
        "wall_s": wall,
        "step_s": clock.step_seconds(),
        "response_length": sum(mean_len) / max(len(mean_len), 1),
    }


# --------------------------------------------------------------------------------------------------------------
# Critic-free: our GRPO/RLOO trainer vs TRL 1.16 GRPOTrainer / RLOOTrainer
# --------------------------------------------------------------------------------------------------------------


def ours_grpo(spec: dict, out: Path) -> dict:
    """Our `train_grpo` with TRL's shape: per iteration R completions (R / k prompts × k samples), one optimizer
    step over them (micro-batches of `batch_size`), reward = the reward model, β = 0.05 (GRPO: k3 in the loss,
    token-level mean as TRL's "dapo"; RLOO: KL in the reward, as TRL's RLOOTrainer)."""
    import rlhf_core.trainers.grpo as grpo

    lengths, inner = GenerationLengths(), grpo.generate

    def recording_generate(*args: Any, **kwargs: Any) -> Any:
        rollout = inner(*args, **kwargs)
        lengths.widths.append(int(rollout.response_ids.shape[1]))
        return rollout

    grpo.generate = recording_generate
    rollout, micro, k, algorithm = spec["rollout_batch_size"], spec["batch_size"], spec["rloo_k"], spec["algorithm"]
    config = grpo.GRPOConfig(
        algorithm=algorithm,
        seed=spec["seed"],
        max_steps=spec["steps"],
        batch_size=micro,
        grad_accum_steps=rollout // micro,
        prompts_per_iteration=rollout // k,
        num_samples_per_prompt=k,
        epochs=1,
        learning_rate=spec["learning_rate"],
        max_new_tokens=spec["max_new_tokens"],
        temperature=1.0,
        kl_coef=0.05,
        kl_in="loss" if algorithm == "grpo" else "reward",
        loss_aggregation="token",
        max_prompt_len=None,
        missing_eos_score=None,
        weak_reward_model="warn",
        min_reward_model_accuracy=0.0,
        dead_signal="warn",
        progress_bar=False,
    )
    logger = ClockLogger(algorithm, lambda step, m: rollout)
    start = time.perf_counter()
    grpo.train_grpo(
        config, spec["model_path"], spec["rm_path"], spec["prompt_rows"], out, logger, reward_model_eval_accuracy=1.0
    )
    wall = time.perf_counter() - start
    mean_len = [m[f"{algorithm}/response_length"] for _, m in logger.records if f"{algorithm}/response_length" in m]
    return {
        "rate": logger.clock.rate(),
        "wall_s": wall,
        "step_s": logger.clock.step_seconds(),
        "decode_steps": lengths.mean(),
        "response_length": sum(mean_len) / max(len(mean_len), 1),
    }


def trl_grpo(spec: dict, out: Path) -> dict:
    """TRL 1.16's `GRPOTrainer` at `ours_grpo`'s shape: k3 KL in the loss (β = 0.05), advantages scaled by the
    group std (`scale_rewards="group"`), token-level loss ("dapo"), one update per generation."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    rollout, micro, k = spec["rollout_batch_size"], spec["batch_size"], spec["rloo_k"]
    data = Dataset.from_list([{"prompt": _messages(r["prompt"])} for r in spec["prompt_rows"]])
    clock, logs = StepClock(), []
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_path"], num_labels=1, dtype=torch.float32)
    reward_tokenizer = AutoTokenizer.from_pretrained(spec["rm_path"])
    args = GRPOConfig(
        output_dir=str(out),
        max_steps=spec["steps"],
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rollout // micro,
        steps_per_generation=rollout // micro,
        num_generations=k,
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        beta=0.05,
        scale_rewards="group",
        loss_type="dapo",
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=spec["seed"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        max_grad_norm=1.0,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
        callbacks=[_trl_clock_callback(clock, lambda state: rollout, logs)],
    )
    trainer.train()
    wall = time.perf_counter() - start
    mean_len = [e["completions/mean_length"] for e in logs if "completions/mean_length" in e]
    return {
        "rate": clock.rate(),
        "wall_s": wall,
        "step_s": clock.step_seconds(),
        "response_length": sum(mean_len) / max(len(mean_len), 1),
    }


def matmul_peak(spec: dict, out: Path) -> dict:
    """The machine's float32 matmul rate: `torch.matmul` of two n×n matrices, 2n³ FLOPs each; the best of
    `rounds` timings of `iters` products (TF32 off on CUDA, so it is a true float32 peak)."""
    n, iters, rounds = spec["matmul_n"], spec["matmul_iters"], spec["matmul_rounds"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    torch.matmul(a, b)
    best = 0.0
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return {"rate": best, "threads": torch.get_num_threads()}


RUNNERS = {
    "matmul": matmul_peak,
    "ours_sft": ours_sft,
    "trl_sft": trl_sft,
    "ours_rm": ours_rm,
    "trl_rm": trl_rm,
    "ours_dpo": ours_dpo,
    "trl_dpo": trl_dpo,
    "ours_ppo": ours_ppo,
    "trl_ppo": trl_ppo,
    "trl_rloo": trl_rloo,
    "ours_grpo": ours_grpo,
    "trl_grpo": trl_grpo,
}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    out = Path(spec["out_dir"])
    result = RUNNERS[spec["runner"]](spec, out)
    result["peak_memory_mb"] = peak_memory_mb()
    result["memory_kind"] = "cuda_max_allocated" if torch.cuda.is_available() else "peak_rss"
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
