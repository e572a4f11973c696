"""Alignment quality on the bundled support-bot task: SFT, SFT→RM→PPO and SFT→DPO, judged on held-out prompts.

    python bench/quality.py --model tiny --seeds 0,1,2
    python bench/quality.py --model smollm2 --seeds 0 --frontier no

Per seed: SFT from the base model on the demonstrations; a reward model from the SFT model on the preference
pairs; PPO (SFT policy, that RM) and DPO (SFT policy, the same pairs) at each β of the frontier. Every policy is
then sampled on the same held-out prompts with the same seeds (`rlhf_core.evaluation.evaluate_models`, plain
sampling at temperature 1, so the KL is the exact Monte-Carlo estimate of KL(π‖π_SFT) per response) and scored by
the gold judge (`rlhf_core.support_bot`, never seen in training), by the RM, and against SFT (win rates).

Writes the table to the `quality-<model>` section of bench/RESULTS.md, the reward-vs-KL frontier to
bench/plots/frontier-<model>.png, and every number to bench/results/quality-<model>.json. Runs live in
runs/bench/quality/<model>/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common import (
    HERE,
    RESULTS,
    ROOT,
    base_model,
    machine,
    markdown_table,
    task_rows,
    utc_now,
    versions,
    write_section,
)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one model's runs (what the table was made with)."""

    sft_steps: int
    sft_batch: int
    sft_lr: float
    rm_steps: int
    rm_batch: int
    rm_lr: float
    ppo_iterations: int
    ppo_rollout: int
    ppo_batch: int
    ppo_epochs: int
    ppo_lr: float
    dpo_steps: int
    dpo_batch: int
    dpo_lr: float
    max_new_tokens: int
    eval_prompts: int
    ppo_betas: tuple[float, ...]
    dpo_betas: tuple[float, ...]
    ppo_beta: float
    dpo_beta: float
    dpo_pairs: int = 0
    """DPO trains on (and precomputes reference log-probs for) only the first this-many training pairs (0: all)."""
    dpo_eval_pairs: int = 0
    """DPO's own held-out loss uses only the first this-many held-out pairs (0: all)."""


RECIPES = {
    # A randomly initialised 2-layer model: SFT has to teach it the task's language, hence the high rates.
    "tiny": Recipe(
        sft_steps=200,
        sft_batch=16,
        sft_lr=3e-3,
        rm_steps=150,
        rm_batch=16,
        rm_lr=1e-3,
        ppo_iterations=40,
        ppo_rollout=32,
        ppo_batch=16,
        ppo_epochs=4,
        ppo_lr=3e-4,
        dpo_steps=150,
        dpo_batch=16,
        dpo_lr=3e-4,
        max_new_tokens=48,
        eval_prompts=64,
        ppo_betas=(0.01, 0.05, 0.2),
        dpo_betas=(0.05, 0.1, 0.5),
        ppo_beta=0.05,
        dpo_beta=0.1,
    ),
    # SmolLM2-135M-Instruct already follows instructions: short SFT, small rates.
    # Meant for ~20 minutes on 2 CPU cores; measured 2026-12-01 on 2 cores shared with a speed benchmark:
    # SFT 9.6 min, RM 19.6 min, PPO 42.5 min, DPO (cut to dpo_steps=8 on 64 pairs) 19.8 min, evaluation apart.
    "smollm2": Recipe(
        sft_steps=10,
        sft_batch=8,
        sft_lr=2e-5,
        rm_steps=20,
        rm_batch=8,
        rm_lr=2e-5,
        ppo_iterations=6,
        ppo_rollout=16,
        ppo_batch=8,
        ppo_epochs=2,
        ppo_lr=1e-5,
        dpo_steps=20,
        dpo_batch=8,
        dpo_lr=5e-6,
        max_new_tokens=40,
        eval_prompts=32,
        ppo_betas=(0.02, 0.05, 0.2),
        dpo_betas=(0.05, 0.1, 0.5),
        ppo_beta=0.05,
        dpo_beta=0.1,
    ),
}


class Timer:
    """Wall seconds per named step, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"  {name}: {self.seconds[name]} s", flush=True)
        return out


STAGE_RECORD = "bench-stage.json"


def run_stage(timer: Timer, name: str, output_dir: Path, resume: bool, fn: Any, *args: Any) -> tuple[Path, dict]:
    """Train one stage into `output_dir` (→ its `model/` directory and metrics), or with `resume` reuse a
    finished one: `output_dir/model/` plus the `bench-stage.json` (metrics, wall seconds) written when it
    finished. The reused stage's wall seconds are those of the run that trained it."""
    record = output_dir / STAGE_RECORD
    if resume and (output_dir / "model" / "config.json").is_file() and record.is_file():
        saved = json.loads(record.read_text())
        timer.seconds[name] = saved["seconds"]
        print(f"  {name}: reused {output_dir / 'model'} (trained in {saved['seconds']} s)", flush=True)
        return output_dir / "model", saved["metrics"]
    result = timer.run(name, fn, *args)
    record.write_text(json.dumps({"seconds": timer.seconds[name], "metrics": result.metrics}, default=str))
    return result.model_dir, result.metrics


def train_seed(
    model: str,
    base: Path,
    rows: dict,
    recipe: Recipe,
    seed: int,
    betas: dict,
    workdir: Path,
    timer: Timer,
    resume: bool = False,
) -> dict[str, Path]:
    """SFT → RM, then PPO and DPO at every β; returns name → model directory (plus "rm")."""
    from rlhf_core.trainers.dpo import DPOConfig, train_dpo
    from rlhf_core.trainers.ppo import PPOConfig, train_ppo
    from rlhf_core.trainers.reward import RewardConfig, train_reward_model
    from rlhf_core.trainers.sft import SFTConfig, train_sft

    held_out_prefs = rows["eval_prefs"]
    common = {"seed": seed, "progress_bar": False, "log_every": 10}
    sft, _ = run_stage(
        timer,
        f"seed{seed}/sft",
        workdir / "sft",
        resume,
        train_sft,
        SFTConfig(
            max_steps=recipe.sft_steps,
            batch_size=recipe.sft_batch,
            learning_rate=recipe.sft_lr,
            warmup_steps=recipe.sft_steps // 10,
            lr_schedule="cosine",
            **common,
        ),
        base,
        rows["sft"],
        rows["eval_sft"],
        workdir / "sft",
    )
    rm, rm_metrics = run_stage(
        timer,
        f"seed{seed}/rm",
        workdir / "rm",
        resume,
        train_reward_model,
        RewardConfig(
            max_steps=recipe.rm_steps,
            batch_size=recipe.rm_batch,
            learning_rate=recipe.rm_lr,
            warmup_steps=recipe.rm_steps // 10,
            lr_schedule="cosine",
            **common,
        ),
        sft,
        rows["prefs"],
        held_out_prefs,
        workdir / "rm",
    )
    models = {"sft": sft, "rm": rm}
    for beta in betas["ppo"]:
        config = PPOConfig(
            max_steps=recipe.ppo_iterations,
            rollout_batch_size=recipe.ppo_rollout,
            batch_size=recipe.ppo_batch,
            ppo_epochs=recipe.ppo_epochs,
            learning_rate=recipe.ppo_lr,
            kl_coef=beta,
            max_new_tokens=recipe.max_new_tokens,
            score_norm="mean_std",
            weak_reward_model="warn",
            **common,
        )
        models[f"ppo β={beta}"], _ = run_stage(
            timer,
            f"seed{seed}/ppo β={beta}",
            workdir / f"ppo-{beta}",
            resume,
            lambda c, *a: train_ppo(c, *a, reward_model_eval_accuracy=rm_metrics.get("rm/eval_accuracy")),
            config,
            sft,
            rm,
            rows["prompts"],
            workdir / f"ppo-{beta}",
        )
    for beta in betas["dpo"]:
        config = DPOConfig(
            max_steps=recipe.dpo_steps,
            batch_size=recipe.dpo_batch,
            learning_rate=recipe.dpo_lr,
            dpo_beta=beta,
            **common,
        )
        models[f"dpo β={beta}"], _ = run_stage(
            timer,
            f"seed{seed}/dpo β={beta}",
            workdir / f"dpo-{beta}",
            resume,
            train_dpo,
            config,
            sft,
            rows["prefs"][: recipe.dpo_pairs or None],
            held_out_prefs[: recipe.dpo_eval_pairs or None],
            workdir / f"dpo-{beta}",
        )
    models["rm_eval_accuracy"] = rm_metrics.get("rm/eval_accuracy", float("nan"))
    return models


def evaluate_seed(models: dict, rows: dict, recipe: Recipe, seed: int, timer: Timer) -> dict[str, Any]:
    from rlhf_core.evaluation import evaluate_models
    from rlhf_core.generation import SamplingConfig
    from rlhf_core.support_bot import gold_score

    policies = {k: v for k, v in models.items() if k not in ("rm", "rm_eval_accuracy")}
    report = timer.run(
        f"seed{seed}/evaluate",
        evaluate_models,
        policies,
        rows["eval_prompts"][: recipe.eval_prompts],
        SamplingConfig(max_new_tokens=recipe.max_new_tokens, temperature=1.0),
        reward_model_path=models["rm"],
        reference_model_path=models["sft"],
        gold_fn=gold_score,
        baseline="sft",
        seed=1000 + seed,
    )
    gold = {name: [row[f"{name}/gold_score"] for row in report.samples] for name in policies}
    return {"metrics": report.metrics, "gold": gold, "samples": report.samples[:3]}


# --------------------------------------------------------------------------------------------------------------
# Aggregation over seeds, table and plot
# --------------------------------------------------------------------------------------------------------------


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def aggregate(per_seed: list[dict]) -> dict[str, dict[str, Any]]:
    """Per model: gold mean ± s.e. over all (seed, prompt) responses; other metrics averaged over seeds, plus the
    per-seed win rates by gold."""
    out: dict[str, dict[str, Any]] = {}
    for name in per_seed[0]["metrics"]:
        gold = [g for seed in per_seed for g in seed["gold"][name]]
        metrics = [seed["metrics"][name] for seed in per_seed]
        mean_of = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        gold_mean, gold_se = _mean_stderr(gold)
        out[name] = {
            **mean_of,
            "gold_mean": gold_mean,
            "gold_stderr": gold_se,
            "win_rate_gold_per_seed": [m["eval/win_rate_gold"] for m in metrics],
        }
    return out


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def table(agg: dict, recipe: Recipe) -> str:
    header = [
        "model",
        "gold score (mean ± s.e.)",
        "RM score",
        "KL to SFT (nats/response)",
        "win vs SFT (gold)",
        "win vs SFT (RM)",
        "length (tokens)",
        "no-EOS share",
        "distinct-2",
    ]
    main = ["sft", f"ppo β={recipe.ppo_beta}", f"dpo β={recipe.dpo_beta}"]
    order = main + [n for n in agg if n not in main]
    rows = []
    for name in order:
        if name not in agg:
            continue
        a = agg[name]
        win = _f(a["eval/win_rate_gold"]) + (
            f" (seeds: {', '.join(_f(w, 2) for w in a['win_rate_gold_per_seed'])})"
            if len(a["win_rate_gold_per_seed"]) > 1
            else ""
        )
        rows.append(
            [
                f"**{name}**" if name in main else name,
                f"{_f(a['gold_mean'])} ± {_f(a['gold_stderr'])}",
                _f(a["eval/rm_score"]),
                _f(a["eval/kl_to_ref"], 2),
                win,
                _f(a["eval/win_rate_rm"]),
                _f(a["eval/response_length"], 1),
                _f(a["eval/no_eos_fraction"], 2),
                _f(a["eval/distinct_2"]),
            ]
        )
    return markdown_table(header, rows)


def target_line(agg: dict, recipe: Recipe) -> str:
    parts = []
    for name in (f"ppo β={recipe.ppo_beta}", f"dpo β={recipe.dpo_beta}"):
        if name in agg:
            win, kl = agg[name]["eval/win_rate_gold"], agg[name]["eval/kl_to_ref"]
            ok = win >= 0.7 and kl <= 10.0
            parts.append(f"{name}: win {_f(win, 2)} at KL {_f(kl, 2)} {'✅' if ok else '❌'}")
    return "Target (win ≥ 0.70 vs SFT by gold at KL ≤ 10 nats/response): " + "; ".join(parts) + "."


def frontier_points(per_seed: list[dict], key: str) -> dict[str, list[tuple[float, float, float, float, str]]]:
    """Per method, one point per β: (mean KL, s.e. KL, mean Δscore vs the seed's SFT, s.e. Δscore) over seeds.

    Δ against the same seed's SFT because each seed trains its own RM (RM scores of two seeds are on different
    scales) and its own SFT."""
    points: dict[str, list[tuple[float, float, float, float, str]]] = {"ppo": [], "dpo": []}
    for name in per_seed[0]["metrics"]:
        method = name.split(" ")[0]
        if method not in points:
            continue
        kls = [seed["metrics"][name]["eval/kl_to_ref"] for seed in per_seed]
        deltas = [seed["metrics"][name][key] - seed["metrics"]["sft"][key] for seed in per_seed]
        (kl, kl_se), (delta, delta_se) = _mean_stderr(kls), _mean_stderr(deltas)
        points[method].append((kl, kl_se, delta, delta_se, name.split("=")[-1]))
    return {m: sorted(p) for m, p in points.items()}


def plot_frontier(per_seed: list[dict], model: str, path: Path) -> None:
    """The DPO paper's frontier: score gain over SFT vs KL(π‖π_SFT), per method and β (mean ± s.e. over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"ppo": "tab:blue", "dpo": "tab:orange"}
    for ax, key, label in (
        (axes[0], "eval/gold_score", "gold score − SFT's (judge)"),
        (axes[1], "eval/rm_score", "RM score − SFT's"),
    ):
        for method, pts in frontier_points(per_seed, key).items():
            xs, xerr, ys, yerr, betas = zip(*pts, strict=True) if pts else ((), (), (), (), ())
            xerr = [0.0 if e != e else e for e in xerr]
            yerr = [0.0 if e != e else e for e in yerr]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, color=colors[method], marker="o", capsize=3, label=method.upper())
            for x, y, b in zip(xs, ys, betas, strict=True):
                ax.annotate(f"β={b}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0.0, color="black", lw=0.8, ls="--")
        ax.scatter([0.0], [0.0], color="black", marker="*", s=80, label="SFT", zorder=3)
        ax.set_xlabel("KL(π ‖ π_SFT) per response (nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Reward vs KL frontier — support-bot task, {model}, {len(per_seed)} seed(s), mean ± s.e.")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_rows(rows: dict) -> dict:
    """Hold out a slice of the demonstrations and pairs for the trainers' own eval losses (eval prompts for the
    judge are the task's held-out prompt file)."""
    held = max(8, len(rows["prefs"]) // 10)
    return {
        **rows,
        "sft": rows["sft"][held:],
        "eval_sft": rows["sft"][:held],
        "prefs": rows["prefs"][held:],
        "eval_prefs": rows["prefs"][:held],
    }


def override_recipe(recipe: Recipe, assignments: str) -> Recipe:
    """`recipe` with the `field=value` pairs of `assignments` (comma-separated) replaced, values cast to the
    field's type (tuples of floats: `ppo_betas=0.02/0.05`)."""
    changes: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in assignments.split(","))):
        key, _, value = item.partition("=")
        if key not in Recipe.__dataclass_fields__:
            raise SystemExit(f"--set: unknown recipe field {key!r}")
        current = getattr(recipe, key)
        changes[key] = tuple(float(v) for v in value.split("/")) if isinstance(current, tuple) else type(current)(value)
    return replace(recipe, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(RECIPES), default="tiny")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--frontier",
        choices=["yes", "no"],
        default="yes",
        help="train PPO and DPO at every β of the recipe (no: the default β only)",
    )
    parser.add_argument("--data", default=str(ROOT / "data" / "support_bot"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--keep-runs", action="store_true", help="keep runs/bench/quality/<model>/ afterwards")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the stages a previous --keep-runs run of the same recipe finished (their "
        "model/ and bench-stage.json in runs/bench/quality/<model>/seedN/) instead of "
        "starting over",
    )
    parser.add_argument(
        "--set",
        default="",
        metavar="FIELD=VALUE,...",
        help="override fields of the model's recipe, e.g. dpo_steps=10,eval_prompts=16 (reported with the table)",
    )
    args = parser.parse_args()
    recipe = override_recipe(RECIPES[args.model], args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    betas = (
        {"ppo": recipe.ppo_betas, "dpo": recipe.dpo_betas}
        if args.frontier == "yes"
        else {"ppo": (recipe.ppo_beta,), "dpo": (recipe.dpo_beta,)}
    )
    base = base_model(args.model)
    rows = split_rows(task_rows(Path(args.data)))
    runs = ROOT / "runs" / "bench" / "quality" / args.model
    started, timer, per_seed, rm_acc = time.perf_counter(), Timer(), [], []
    for seed in seeds:
        workdir = runs / f"seed{seed}"
        if not args.resume:
            shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        models = train_seed(args.model, base, rows, recipe, seed, betas, workdir, timer, args.resume)
        rm_acc.append(models.pop("rm_eval_accuracy"))
        per_seed.append(evaluate_seed(models, rows, recipe, seed, timer))
    if not args.keep_runs:
        shutil.rmtree(runs, ignore_errors=True)
    agg = aggregate(per_seed)
    plot = HERE / "plots" / f"frontier-{args.model}.png"
    plot_frontier(per_seed, args.model, plot)
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"quality-{args.model}.json").write_text(
        json.dumps(
            {
                "recipe": asdict(recipe),
                "seeds": seeds,
                "rm_eval_accuracy": rm_acc,
                "per_seed": per_seed,
                "aggregate": agg,
                "seconds": timer.seconds,
            },
            indent=1,
            default=str,
        )
    )
    info, ver = machine(), versions()
    command = f"python bench/quality.py --model {args.model} --seeds {args.seeds} --frontier {args.frontier}" + (
        f" --set {args.set}" if args.set else ""
    )
    body = "\n".join(
        [
            f"### Quality: {args.model} ({base.name})",
            "",
            f"`{command}` — {utc_now()}, {sum(timer.seconds.values()):.0f} s of stages"
            f"{' (reused ones: the wall time of the run that trained them)' if args.resume else ''}, "
            f"{time.perf_counter() - started:.0f} s this call, on {info['cpu']} ({info['cores']} "
            f"cores, GPU: {info['gpu']}); torch {ver.get('torch')}, transformers {ver.get('transformers')}.",
            "",
            f"Seeds {seeds}; {recipe.eval_prompts} held-out prompts, one sample each per seed (temperature 1, "
            f"max_new_tokens {recipe.max_new_tokens}); gold s.e. over all (seed, prompt) responses, other columns "
            f"averaged over seeds. Reward model held-out accuracy: {', '.join(_f(a) for a in rm_acc)}. "
            f"Recipe: {json.dumps(asdict(recipe))}.",
            "",
            table(agg, recipe),
            "",
            target_line(agg, recipe),
            "",
            f"Frontier: [plots/frontier-{args.model}.png](plots/frontier-{args.model}.png) (β values "
            f"PPO {list(betas['ppo'])}, DPO {list(betas['dpo'])}).",
            "",
            "Wall time per step (s): " + ", ".join(f"{k} {v}" for k, v in timer.seconds.items()) + ".",
        ]
    )
    write_section(f"quality-{args.model}", body, Path(args.out))
    print(body)


if __name__ == "__main__":
    main()
