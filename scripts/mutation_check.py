"""Does the test suite catch a one-line inversion of each RLHF decision? (docs/testing.md)

    python scripts/mutation_check.py                 # every mutation, each against the tests that name it
    python scripts/mutation_check.py --only dpo      # mutations whose name contains "dpo"

For each curated mutation — a decision a one-line bug could invert (preference direction, KL sign, advantage
sign, win rate, promotion, cache key, ...) — the repository is copied to a temporary directory (without `.venv`,
`.git`, `runs/`), the one line is changed there, and the tests listed for it run in that copy. A mutation is
*caught* when those tests fail. The working tree is never modified. Prints a Markdown table; exit status 1 when
any mutation survives. Slow (each mutation runs real training tests): run it by hand before a release or after
changing a guard, not in CI.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(
    ".venv*", ".git", "runs", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "models", "mlruns", "mlartifacts"
)


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "dpo: chosen and rejected swapped",
        "rlhf_core/trainers/dpo.py",
        '            chosen,\n            rejected,\n            batch["ref_chosen_logps"],\n'
        '            batch["ref_rejected_logps"],',
        '            rejected,\n            chosen,\n            batch["ref_rejected_logps"],\n'
        '            batch["ref_chosen_logps"],',
        ("tests/test_learning_direction.py::test_dpo_on_the_bundled_pairs_raises_the_gold_score",),
    ),
    Mutation(
        "reward model: preference direction swapped",
        "rlhf_core/trainers/reward.py",
        'chosen, rejected = scores[batch["chosen_index"]], scores[batch["rejected_index"]]',
        'chosen, rejected = scores[batch["rejected_index"]], scores[batch["chosen_index"]]',
        ("tests/test_reward_trainer.py",),
    ),
    Mutation(
        "ppo: advantage sign flipped",
        "rlhf_core/trainers/ppo.py",
        "ppo_policy_loss(out.logprobs, mb.old_logprobs, mb.advantages, mask, config.clip_eps)",
        "ppo_policy_loss(out.logprobs, mb.old_logprobs, -mb.advantages, mask, config.clip_eps)",
        ("tests/test_learning_direction.py::test_ppo_with_the_gold_judge_as_reward_raises_the_gold_score",),
    ),
    Mutation(
        "kl penalty: sign flipped",
        "rlhf_core/losses.py",
        "    rewards = -kl_coef * kl",
        "    rewards = kl_coef * kl",
        ("tests/test_losses.py",),
    ),
    Mutation(
        "value targets: A - V instead of A + V",
        "rlhf_core/losses.py",
        "returns = torch.where(valid, advantages + values, zero)",
        "returns = torch.where(valid, advantages - values, zero)",
        ("tests/test_losses.py",),
    ),
    Mutation(
        "no-EOS penalty: never applied",
        "rlhf_core/experience.py",
        "scores = torch.where(ended_with_eos.bool(), scores, torch.full_like(scores, config.missing_eos_score))",
        "scores = scores",
        ("tests/test_experience.py",),
    ),
    Mutation(
        "collection: worst response ranked first",
        "rlhf_core/collection.py",
        "order = [first_of_score[score] for score in sorted(first_of_score, reverse=True)]",
        "order = [first_of_score[score] for score in sorted(first_of_score)]",
        ("tests/test_collection.py",),
    ),
    Mutation(
        "evaluation: win rate the wrong way round",
        "rlhf_core/evaluation.py",
        "wins = sum(1.0 if a > b else 0.5 if a == b else 0.0",
        "wins = sum(1.0 if a < b else 0.5 if a == b else 0.0",
        ("tests/test_evaluation.py",),
    ),
    Mutation(
        "promotion: @champion moves to a worse candidate",
        "flows/pipeline.py",
        "champion_value is None or value > champion_value",
        "champion_value is None or value < champion_value",
        ("tests/test_promotion.py",),
    ),
    Mutation(
        "lora: requested but not applied",
        "rlhf_core/trainers/setup.py",
        "    return get_peft_model(model, peft_config)",
        "    return model",
        ("tests/test_sft_trainer.py",),
    ),
    Mutation(
        "sampling: draws ignore the probabilities (uniform over the candidates)",
        "rlhf_core/generation.py",
        "    return torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(-1)",
        "    return torch.multinomial(torch.ones_like(log_p), 1, generator=generator).squeeze(-1)",
        ("tests/test_generation.py",),
    ),
    Mutation(
        "sampling: top-p window trusted when it holds less than top_p",
        "rlhf_core/generation.py",
        "        if not top_k and not bool((mass_before[:, -1] + probs[:, -1] >= top_p).all()):",
        "        if False:",
        ("tests/test_generation.py",),
    ),
    Mutation(
        "packing: a response sees the other responses of its prompt",
        "rlhf_core/packing.py",
        "    visible_part = (part[None, :] == _PROMPT) | (part[None, :] == part[:, None])",
        "    visible_part = part[None, :] >= _PROMPT",
        ("tests/test_packing.py", "tests/test_dpo_trainer.py"),
    ),
    Mutation(
        "packing: the reward model reads the score one token before each response's end",
        "rlhf_core/packing.py",
        "            last.append(len(ids) - 1)",
        "            last.append(len(ids) - 2)",
        ("tests/test_reward_trainer.py",),
    ),
    Mutation(
        "ppo: the sampler's values stay at the prompt's state (the hook keeps its first capture)",
        "rlhf_core/generation.py",
        '        lambda _module, args: head_input.__setitem__("hidden", args[0])',
        '        lambda _module, args: head_input.setdefault("hidden", args[0])',
        ("tests/test_experience.py",),
    ),
    Mutation(
        "rloo: leave-one-out baseline subtracted the wrong way",
        "rlhf_core/group_advantages.py",
        "    return scores - others_mean",
        "    return others_mean - scores",
        ("tests/test_group_advantages.py",),
    ),
    Mutation(
        "grpo: group-normalised advantages inverted",
        "rlhf_core/group_advantages.py",
        "    centred = scores - scores.mean(dim=-1, keepdim=True)",
        "    centred = scores.mean(dim=-1, keepdim=True) - scores",
        ("tests/test_group_advantages.py",),
    ),
    Mutation(
        "cache key: library sources ignored",
        "tasks/tracking.py",
        'SOURCE_PACKAGES = ("rlhf_core", "schemas", "tasks")',
        "SOURCE_PACKAGES = ()",
        ("tests/test_caching.py",),
    ),
    Mutation(
        "lengths: a limit that cuts the data passes",
        "rlhf_core/lengths.py",
        "    if cut > 1.0 - policy.coverage + 1e-12:",
        "    if cut < 0:",
        ("tests/test_lengths.py",),
    ),
    Mutation(
        "reward-model guard: an RM at chance accepted",
        "rlhf_core/guards.py",
        "    if accuracy < min_accuracy:",
        "    if accuracy < 0:",
        ("tests/test_ppo_trainer.py::test_refuses_a_reward_model_at_chance",),
    ),
    Mutation(
        "launch: left out of the cache key",
        "tasks/launch.py",
        'return config if key is None else {**asdict(config), "launch": key}',
        "return config",
        ("tests/test_launch_settings.py",),
    ),
    Mutation(
        "launch: each rank seeds its own data order",
        "rlhf_core/launch_worker.py",
        "config = config_from_dict(config_cls, spec.config)",
        'config = config_from_dict(config_cls, {**spec.config, "seed": spec.config["seed"] + rank()})',
        ("tests/test_launch.py::test_two_accelerate_processes_follow_the_one_process_curves",),
    ),
)


def run(mutation: Mutation, timeout: float) -> tuple[str, float]:
    """`caught`, `SURVIVED` or `not applicable` (the original line is gone: update the list), and seconds."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE)
        target = copy / mutation.path
        text = target.read_text()
        if text.count(mutation.original) != 1:
            return "not applicable", 0.0
        target.write_text(text.replace(mutation.original, mutation.mutated))
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests]
        try:
            result = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=timeout)
            status = "caught" if result.returncode != 0 else "SURVIVED"
        except subprocess.TimeoutExpired:
            status = "caught (timeout)"
    return status, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m.name]
    print("| mutation | file | tests | result | seconds |\n| --- | --- | --- | --- | --- |", flush=True)
    survived = 0
    for mutation in chosen:
        status, seconds = run(mutation, args.timeout)
        survived += status != "caught" and not status.startswith("caught")
        print(
            f"| {mutation.name} | `{mutation.path}` | {', '.join(f'`{t}`' for t in mutation.tests)} | {status} | "
            f"{seconds:.0f} |",
            flush=True,
        )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
