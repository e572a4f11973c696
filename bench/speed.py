"""Speed and memory: our SFT, reward-model, DPO, PPO and GRPO/RLOO trainers against TRL, same model, data and batch shapes.

    python bench/speed.py --model tiny --reps 3                      # quick
    python bench/speed.py --model smollm2 --reps 3 --out bench/RESULTS.md
    python bench/speed.py --smoke                                    # a few minutes: ratios only, before/after a change

Pairs (ours vs TRL), each run in a fresh process of the same interpreter (`bench/.venv-trl`: TRL 1.16;
`bench/.venv-trl-ppo`: TRL 1.12, the last release with a PPO trainer), launched the same way (`python
bench/speed_workers.py`), full fine-tuning in float32:

    sft   our train_sft          vs  trl.SFTTrainer                   tokens/s (non-padding)
    rm    our train_reward_model vs  trl.RewardTrainer                pairs/s
    dpo   our train_dpo          vs  trl.DPOTrainer                   pairs/s
    ppo   our train_ppo (critic="separate": value model from the RM)
                                 vs  trl.experimental.ppo.PPOTrainer (TRL 1.12)   episodes/s
    rloo  our train_ppo (shared critic, 1 epoch: one update per rollout)
                                 vs  trl.RLOOTrainer (TRL 1.16)       episodes/s
    grpo_cf  our train_grpo (algorithm grpo: no critic, k3 KL in the loss, token-level loss)
                                 vs  trl.GRPOTrainer (TRL 1.16)       samples/s
    rloo_cf  our train_grpo (algorithm rloo: no critic, KL in the reward)
                                 vs  trl.RLOOTrainer (TRL 1.16)       samples/s
    (rloo, grpo_cf, rloo_cf: R = rollout_batch_size completions per iteration, R / k prompts × k = rloo_k samples,
    one optimizer step over them in micro-batches of ppo_batch_size, the same RM as the reward, β = 0.05)

Every repetition runs every pair, ours and TRL back to back (their order alternating between repetitions), so
background load hits both sides alike; ratios are the median over repetitions of the per-repetition ratio. A
float32 matmul peak is measured in every repetition too, and our SFT FLOP rate is reported against it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    HERE,
    RESULTS,
    ROOT,
    base_model,
    initial_reward_model,
    machine,
    markdown_table,
    task_rows,
    utc_now,
    versions,
    write_section,
)

VENV_TRL = HERE / ".venv-trl"
VENV_TRL_PPO = HERE / ".venv-trl-ppo"

# Shapes per model: small enough for a few minutes per repetition on 2 CPU cores.
SHAPES = {
    "tiny": {
        "batch_size": 8,
        "steps": 30,
        "max_length": 1024,
        "rollout_batch_size": 16,
        "ppo_batch_size": 8,
        "ppo_epochs": 2,
        "ppo_steps": 6,
        "max_new_tokens": 32,
        "rloo_k": 4,
        "matmul_n": 2048,
        # PPO at realistic lengths (pairs ppo64, ppo64_default)
        "long_rollout": 16,
        "long_micro": 8,
        "long_new_tokens": 64,
        "long_steps": 3,
    },
    "smollm2": {
        "batch_size": 4,
        "steps": 5,
        "max_length": 1024,
        "rollout_batch_size": 8,
        "ppo_batch_size": 4,
        "ppo_epochs": 2,
        "ppo_steps": 3,
        "max_new_tokens": 16,
        "rloo_k": 4,
        "matmul_n": 2048,
        "long_rollout": 16,
        "long_micro": 8,
        "long_new_tokens": 64,
        "long_steps": 3,
    },
}


@dataclass(frozen=True)
class Pair:
    """One comparison: our runner vs TRL's, both run by `venv`'s interpreter."""

    stage: str
    ours: str
    trl: str
    venv: Path
    unit: str
    peer: str


PAIRS = {
    "sft": Pair("sft", "ours_sft", "trl_sft", VENV_TRL, "tokens/s", "SFTTrainer (TRL 1.16)"),
    "rm": Pair("rm", "ours_rm", "trl_rm", VENV_TRL, "pairs/s", "RewardTrainer (TRL 1.16)"),
    "dpo": Pair("dpo", "ours_dpo", "trl_dpo", VENV_TRL, "pairs/s", "DPOTrainer (TRL 1.16)"),
    "ppo": Pair("ppo", "ours_ppo", "trl_ppo", VENV_TRL_PPO, "episodes/s", "PPOTrainer (TRL 1.12, experimental)"),
    "rloo": Pair("rloo", "ours_ppo", "trl_rloo", VENV_TRL, "episodes/s", "RLOOTrainer (TRL 1.16)"),
    # PPO at realistic lengths (rollout 16, 64 new tokens): at equal work (both a separate critic from the RM),
    # and each with its own default critic (ours: the guide's shared body and value head; TRL: a separate model).
    "ppo64": Pair("ppo64", "ours_ppo", "trl_ppo", VENV_TRL_PPO, "episodes/s", "PPOTrainer (TRL 1.12), equal work"),
    "ppo64_default": Pair(
        "ppo64_default", "ours_ppo", "trl_ppo", VENV_TRL_PPO, "episodes/s", "PPOTrainer (TRL 1.12), each default"
    ),
    # Critic-free against critic-free: our GRPO/RLOO trainer (no value head) at TRL's shape.
    "grpo_cf": Pair("grpo_cf", "ours_grpo", "trl_grpo", VENV_TRL, "samples/s", "GRPOTrainer (TRL 1.16)"),
    "rloo_cf": Pair("rloo_cf", "ours_grpo", "trl_rloo", VENV_TRL, "samples/s", "RLOOTrainer (TRL 1.16)"),
}


def python_of(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{venv} is missing: see bench/README.md (one venv per TRL version)")
    return python


def run_worker(python: Path, spec: dict, workdir: Path, timeout: float) -> dict:
    """One measured run in a fresh process; returns the worker's result (or {"error": ...})."""
    name = f"{spec['runner']}-{spec['stage']}-r{spec['rep']}"
    spec = {**spec, "out_dir": str(workdir / name)}
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [str(python), str(HERE / "speed_workers.py"), str(spec_path), str(result_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not result_path.is_file():
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"  {name} FAILED:\n{tail}", file=sys.stderr)
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"}
    result = json.loads(result_path.read_text())
    print(
        f"  {name}: rate {result['rate']:.2f}  peak {result.get('peak_memory_mb', 0):.0f} MiB  "
        f"({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    return result


def stage_spec(stage: str, shapes: dict, model: Path, rm: Path, rows: dict, rep: int) -> dict:
    """The settings both sides of `stage` get (the runner name is added per side)."""
    spec: dict[str, Any] = {
        "stage": stage,
        "rep": rep,
        "seed": rep,
        "model_path": str(model),
        "rm_path": str(rm),
        "max_length": shapes["max_length"],
    }
    if stage in ("sft", "rm", "dpo"):
        lr = {"sft": 5e-5, "rm": 1e-5, "dpo": 5e-6}[stage]
        spec.update(batch_size=shapes["batch_size"], steps=shapes["steps"], learning_rate=lr)
        n = shapes["batch_size"] * shapes["steps"]
        spec["sft_rows" if stage == "sft" else "pref_rows"] = rows["sft" if stage == "sft" else "prefs"][:n]
    else:
        spec.update(
            batch_size=shapes["ppo_batch_size"],
            rollout_batch_size=shapes["rollout_batch_size"],
            steps=shapes["ppo_steps"],
            max_new_tokens=shapes["max_new_tokens"],
            learning_rate=1e-6,
            rloo_k=shapes["rloo_k"],
            prompt_rows=rows["prompts"][: shapes["rollout_batch_size"] * shapes["ppo_steps"]],
        )
        if stage.startswith("ppo64"):
            spec.update(
                batch_size=shapes["long_micro"],
                rollout_batch_size=shapes["long_rollout"],
                steps=shapes["long_steps"],
                max_new_tokens=shapes["long_new_tokens"],
                prompt_rows=rows["prompts"][: shapes["long_rollout"] * shapes["long_steps"]],
                critic="shared" if stage == "ppo64_default" else "separate",
                ppo_epochs=shapes["ppo_epochs"],
            )
            return spec
        # PPO vs PPOTrainer: same models (separate critic from the RM) and epochs. RLOO shape: one update per
        # rollout batch, our default shared critic.
        spec.update(critic="separate", ppo_epochs=shapes["ppo_epochs"]) if stage == "ppo" else spec.update(
            critic="shared", ppo_epochs=1
        )
        if stage in ("grpo_cf", "rloo_cf"):  # the same rollout shape, K, lengths and micro-batch on both sides
            spec["algorithm"] = stage.removesuffix("_cf")
    return spec


def run_all(args: argparse.Namespace, workdir: Path) -> dict:
    shapes = SHAPES[args.model]
    model = base_model(args.model)
    rm = initial_reward_model(model)
    rows = task_rows(Path(args.data))
    stages = [s for s in args.stages.split(",") if s]
    raw: dict[str, Any] = {"matmul": [], **{s: {} for s in stages}}
    for rep in range(args.reps):
        print(f"repetition {rep + 1}/{args.reps}", flush=True)
        raw["matmul"].append(
            run_worker(
                python_of(VENV_TRL),
                {
                    "runner": "matmul",
                    "stage": "peak",
                    "rep": rep,
                    "matmul_n": shapes["matmul_n"],
                    "matmul_iters": 10,
                    "matmul_rounds": 3,
                    "threads": args.threads,
                },
                workdir,
                args.timeout,
            )
        )
        for stage in stages:
            pair, spec = PAIRS[stage], stage_spec(stage, shapes, model, rm, rows, rep)
            spec["threads"] = args.threads
            spec["trl_precompute_ref"] = args.trl_precompute_ref and stage == "dpo"
            spec["bf16"] = args.bf16 and stage in ("sft", "rm", "dpo", "ppo64_default", "ppo64")
            sides = [("ours", {"runner": pair.ours}), ("trl", {"runner": pair.trl})]
            for side, extra in sides if rep % 2 == 0 else sides[::-1]:
                raw[stage].setdefault(side, []).append(
                    run_worker(python_of(pair.venv), {**spec, **extra}, workdir, args.timeout)
                )
    return {"raw": raw, "shapes": shapes, "model": args.model, "stages": stages}


def assemble(args: argparse.Namespace, workdir: Path) -> dict:
    """The `run_all` result rebuilt from the spec/result files an interrupted run left in `workdir`: every
    repetition whose runs of a stage all finished (a partial repetition is dropped, so ratios stay paired)."""
    shapes, stages = SHAPES[args.model], [s for s in args.stages.split(",") if s]
    found: dict[tuple[str, int], dict[str, dict]] = {}
    matmul: dict[int, dict] = {}
    for spec_path in sorted(workdir.glob("*.spec.json")):
        result_path = spec_path.with_name(spec_path.name.replace(".spec.json", ".result.json"))
        if not result_path.is_file():
            continue
        spec, result = json.loads(spec_path.read_text()), json.loads(result_path.read_text())
        if spec["runner"] == "matmul":
            matmul[spec["rep"]] = result
            continue
        if spec.get("fused_adamw"):  # a "proposed change" run of an older version of this script
            continue
        side = "ours" if spec["runner"].startswith("ours") else "trl"
        found.setdefault((spec["stage"], spec["rep"]), {})[side] = result
    raw: dict[str, Any] = {"matmul": [matmul[r] for r in sorted(matmul)], **{s: {} for s in stages}}
    for (stage, _rep), sides in sorted(found.items()):
        if stage in stages and {"ours", "trl"} <= set(sides):
            for side, result in sides.items():
                raw[stage].setdefault(side, []).append(result)
    return {"raw": raw, "shapes": shapes, "model": args.model, "stages": stages}


# --------------------------------------------------------------------------------------------------------------
# FLOPs and the report
# --------------------------------------------------------------------------------------------------------------


def flops_per_token(model_dir: Path, mean_row_tokens: float) -> tuple[float, int]:
    """Training FLOPs per (non-padding) token of a Llama model, and N_matmul.

    6·N_matmul (forward 2N, backward 4N) with N_matmul the weights of every matmul: attention and MLP projections
    of all layers and the LM head (tied or not; the input embedding is a gather, not counted), plus causal
    attention: per layer, QKᵀ and AV over on average L/2 keys cost 2·2·(L/2)·d_attn forward, ×3 with backward
    → 6·L·d_attn, L = mean row length (tokens).
    """
    config = json.loads((model_dir / "config.json").read_text())
    d, layers, ff, vocab = (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["intermediate_size"],
        config["vocab_size"],
    )
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads") or heads
    d_attn = heads * head_dim
    per_layer = d * d_attn + 2 * d * kv * head_dim + d_attn * d + 3 * d * ff
    n_matmul = layers * per_layer + d * vocab
    return 6 * n_matmul + 6 * layers * mean_row_tokens * d_attn, n_matmul


def _ok(results: list[dict]) -> list[dict]:
    return [r for r in results if "error" not in r]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _paired_ratios(ours: list[dict], trl: list[dict], key: str) -> list[float]:
    return [
        o[key] / t[key] for o, t in zip(ours, trl, strict=True) if "error" not in o and "error" not in t and t[key] > 0
    ]


def summarize(run: dict) -> dict:
    """Medians per side and the medians of the paired per-repetition ratios."""
    # The peak is the best the machine showed in any repetition (a conservative denominator under load).
    out: dict[str, Any] = {
        "matmul_peak_gflops": max([r["rate"] / 1e9 for r in _ok(run["raw"]["matmul"])], default=float("nan"))
    }
    for stage in run["stages"]:
        ours, trl = run["raw"][stage].get("ours", []), run["raw"][stage].get("trl", [])
        out[stage] = {
            "ours_rate": _median([r["rate"] for r in _ok(ours)]),
            "trl_rate": _median([r["rate"] for r in _ok(trl)]),
            "rate_ratio": _median(_paired_ratios(ours, trl, "rate")),
            "ours_mem": _median([r["peak_memory_mb"] for r in _ok(ours)]),
            "trl_mem": _median([r["peak_memory_mb"] for r in _ok(trl)]),
            "mem_ratio": _median(_paired_ratios(ours, trl, "peak_memory_mb")),
            "ours_wall": _median([r["wall_s"] for r in _ok(ours)]),
            "trl_wall": _median([r["wall_s"] for r in _ok(trl)]),
            "n": len(_paired_ratios(ours, trl, "rate")),
            "errors": [r["error"] for side in run["raw"][stage].values() for r in side if "error" in r],
            "ours_len": _median([r["response_length"] for r in _ok(ours) if "response_length" in r]),
            "trl_len": _median([r["response_length"] for r in _ok(trl) if "response_length" in r]),
            "ours_decode": _median([r["decode_steps"] for r in _ok(ours) if "decode_steps" in r]),
            "trl_decode": _median([r["decode_steps"] for r in _ok(trl) if "decode_steps" in r]),
        }
    return out


TARGETS = {
    "sft": 1.2,
    "rm": None,
    "dpo": 2.0,
    "ppo": 2.0,
    "rloo": None,
    "grpo_cf": 1.5,
    "rloo_cf": 1.5,
    "ppo64": None,
    "ppo64_default": 2.0,
}


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"  # noqa: PLR0124 (nan check)


def report(run: dict, summary: dict, args: argparse.Namespace, model_dir: Path) -> str:
    shapes = run["shapes"]
    rows = []
    for stage in run["stages"]:
        s, pair = summary[stage], PAIRS[stage]
        target = TARGETS[stage]
        verdict = "" if target is None else (" ✅" if s["rate_ratio"] >= target else " ❌")
        mem_verdict = " ✅" if s["mem_ratio"] <= 1.0 else " ❌"
        rows.append(
            [
                stage,
                pair.peer,
                pair.unit,
                _fmt(s["ours_rate"]),
                _fmt(s["trl_rate"]),
                f"**{_fmt(s['rate_ratio'])}×**{verdict}" + (f" (target ≥ {target}×)" if target else ""),
                f"{_fmt(s['ours_mem'], 0)} / {_fmt(s['trl_mem'], 0)}",
                f"{_fmt(s['mem_ratio'])}{mem_verdict}",
                f"{_fmt(s['ours_wall'], 1)} / {_fmt(s['trl_wall'], 1)}",
                s["n"],
            ]
        )
    header = [
        "stage",
        "TRL peer",
        "unit",
        "ours",
        "TRL",
        "ours/TRL",
        "peak MiB ours / TRL",
        "mem ours/TRL",
        "whole call s ours / TRL",
        "reps",
    ]
    lines = [markdown_table(header, rows)]
    for stage in ("ppo", "rloo", "grpo_cf", "rloo_cf", "ppo64", "ppo64_default"):
        if stage in run["stages"]:
            s = summary[stage]
            cap = shapes["long_new_tokens"] if stage.startswith("ppo64") else shapes["max_new_tokens"]
            lines.append(
                f"\n{stage}: mean sampled response length ours {_fmt(s['ours_len'], 1)} tokens"
                + (f", TRL {_fmt(s['trl_len'], 1)}" if s["trl_len"] == s["trl_len"] else "")
                + f"; decode steps per rollout ours {_fmt(s['ours_decode'], 1)}"
                + (f", TRL {_fmt(s['trl_decode'], 1)}" if s["trl_decode"] == s["trl_decode"] else "")
                + f" (max_new_tokens {cap})."
                + split_sentence(run["raw"][stage])
            )
    errors = {st: summary[st]["errors"] for st in run["stages"] if summary[st]["errors"]}
    if errors:
        lines.append("\nFailed runs: " + "; ".join(f"{st}: {e}" for st, es in errors.items() for e in es))
    # The FLOP rate is against the float32 matmul peak: meaningless for a bf16 run.
    if "sft" in run["stages"] and summary["sft"]["ours_rate"] == summary["sft"]["ours_rate"] and not args.bf16:
        lines.append("\n" + flop_paragraph(run, summary, model_dir))
    return "\n".join(lines)


def split_sentence(raw_stage: dict) -> str:
    """ " Seconds per iteration ...": the medians over iterations 2..N of all repetitions, per side."""
    parts = []
    for side in ("ours", "trl"):
        runs = [r for r in _ok(raw_stage.get(side, [])) if "split_s" in r]
        if not runs:
            continue
        medians = {
            part: _median([v for r in runs for v in r["split_s"][part]]) for part in ("generation", "scoring", "update")
        }
        total = sum(medians.values())
        parts.append(
            f"{'ours' if side == 'ours' else 'TRL'} "
            + " / ".join(f"{part} {_fmt(v, 1)} ({_fmt(100 * v / total, 0)}%)" for part, v in medians.items())
        )
    return (" Seconds per iteration (median of iterations 2..N): " + "; ".join(parts) + ".") if parts else ""


def flop_paragraph(run: dict, summary: dict, model_dir: Path) -> str:
    ours = _ok(run["raw"]["sft"]["ours"])
    tokens = ours[0]["tokens"]
    rows = run["shapes"]["batch_size"] * run["shapes"]["steps"]
    per_token, n_matmul = flops_per_token(model_dir, tokens / rows)
    rate = summary["sft"]["ours_rate"] * per_token / 1e9
    peak = summary["matmul_peak_gflops"]
    verdict = "✅" if rate / peak >= 0.6 else "❌"
    return (
        f"Our SFT FLOP rate: {_fmt(rate, 1)} GFLOP/s = **{_fmt(100 * rate / peak, 1)}% of the measured float32 "
        f"matmul peak** ({_fmt(peak, 1)} GFLOP/s, `torch.matmul` {run['shapes']['matmul_n']}², best of 3×10, "
        f"best over repetitions) {verdict} (target ≥ 60% on CPU). Count: {per_token / 1e6:.1f} MFLOP per "
        f"non-padding token = 6·N_matmul (N_matmul = {n_matmul / 1e6:.1f} M: every projection + LM head, "
        f"input embedding excluded) + 6·layers·L·d_attn for causal attention at the mean row length "
        f"L = {tokens / rows:.0f}; padding tokens are not counted as useful work."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; --smoke: 1)")
    parser.add_argument(
        "--stages",
        default=None,
        help="comma-separated pairs (default sft,rm,dpo,ppo,rloo; --smoke: every pair whose TRL venv exists)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a developer's check before and after a change (not a test, not a result): the tiny "
        "model, one repetition, every pair whose TRL venv is there; prints the ratios and "
        "writes nothing into RESULTS.md. The tiny model's steps are mostly per-step "
        "overhead, so compare a smoke run with a smoke run on a quiet machine, never "
        "with the SmolLM2 tables",
    )
    parser.add_argument("--data", default=str(ROOT / "data" / "support_bot"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--fused-adamw",
        action="store_true",
        help="no-op, kept so older commands still run: our optimizer is torch's fused AdamW by "
        "default now (rlhf_core.trainers.common.build_optimizer)",
    )
    parser.add_argument(
        "--assemble", metavar="DIR", help="no new runs: report the finished runs an interrupted run left in DIR"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads of every run (matmul peak included); 0 = torch's default. "
        "1 avoids the stalls of a 2-thread pool on a 2-core machine another job also uses",
    )
    parser.add_argument(
        "--trl-precompute-ref",
        action="store_true",
        help="DPO: TRL precomputes the reference log-probs before training, as ours always does "
        "(default: TRL's default, a live reference forward at every step)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="SFT/RM/DPO and the PPO64 pairs in bf16 autocast on both sides (ours mixed_precision=bf16, TRL "
        "bf16=True); "
        "written to its own section (suffix -bf16)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as failed")
    args = parser.parse_args()
    smoke_defaults(args)
    started = time.perf_counter()
    if args.assemble:
        run = assemble(args, Path(args.assemble))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
            run = run_all(args, Path(tmp))
    summary = summarize(run)
    model_dir = base_model(args.model)
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    key = (
        f"speed-{args.model}-{'-'.join(run['stages'])}"
        + ("-trl-precompute-ref" if args.trl_precompute_ref else "")
        + ("-bf16" if args.bf16 else "")
    )
    if not args.smoke:
        (results_dir / f"{key}.json").write_text(json.dumps({**run, "summary": summary}, indent=1))
    info = machine()
    trl_versions = versions(python_of(VENV_TRL))
    # TRL 1.12's venv is needed only for the PPO pair.
    ppo_versions = versions(python_of(VENV_TRL_PPO)) if (VENV_TRL_PPO / "bin" / "python").is_file() else {}
    shapes = run["shapes"]
    command = (
        f"python bench/speed.py --model {args.model} --reps {args.reps} --stages {args.stages}"
        + (f" --threads {args.threads}" if args.threads else "")
        + (" --trl-precompute-ref" if args.trl_precompute_ref else "")
        + (" --bf16" if args.bf16 else "")
        + (f" --data {args.data}" if Path(args.data) != ROOT / "data" / "support_bot" else "")
        + (f" --assemble {args.assemble}" if args.assemble else "")
    )
    body = "\n".join(
        [
            f"### Speed and memory: {args.model} ({model_dir.name}), stages {', '.join(run['stages'])}"
            + (", bf16" if args.bf16 else ""),
            "",
            f"`{command}` — {utc_now()}, {time.perf_counter() - started:.0f} s. Machine: {info['cpu']}, "
            f"{info['cores']} cores, {info['ram_gib']} GiB RAM, GPU: {info['gpu']}. torch {trl_versions['torch']}, "
            f"transformers {trl_versions['transformers']}, accelerate {trl_versions['accelerate']}; TRL "
            f"{trl_versions.get('trl')} (SFT/RM/DPO/RLOO) and TRL {ppo_versions.get('trl')} (PPO). torch threads per "
            f"run: {', '.join(sorted({str(r['threads']) for r in run['raw']['matmul'] if 'threads' in r})) or 'n/a'}"
            f"{' (--threads)' if args.threads else ' (torch default)'}.",
            "",
            f"Data: `{args.data}` (first rows of demonstrations / preferences / prompts_train).",
            "",
            f"Shapes: SFT/RM/DPO batch {shapes['batch_size']} × {shapes['steps']} steps (no accumulation); PPO "
            f"rollout {shapes['rollout_batch_size']} prompts/iteration, micro-batch {shapes['ppo_batch_size']}, "
            f"{shapes['ppo_epochs']} epochs × 1 optimizer step, {shapes['ppo_steps']} iterations, "
            f"max_new_tokens {shapes['max_new_tokens']}; RLOO-shaped: same rollout, 1 epoch, k = {shapes['rloo_k']} "
            "samples per prompt on TRL's side."
            + (
                f" PPO at realistic lengths (ppo64, ppo64_default): rollout {shapes['long_rollout']} prompts, "
                f"micro-batch {shapes['long_micro']}, {shapes['long_new_tokens']} new tokens at most, "
                f"{shapes['ppo_epochs']} epochs, {shapes['long_steps']} iterations; ppo64 gives both sides a "
                "separate critic from the RM (equal work), ppo64_default gives each its default critic (ours: the "
                "shared body with a value head; TRL: a separate value model)."
                if any(st.startswith("ppo64") for st in run["stages"])
                else ""
            )
            + (
                " Full fine-tuning, bf16 autocast over float32 weights on both sides for SFT/RM/DPO/PPO64 (ours "
                "`mixed_precision: bf16`, TRL `bf16=True`), AdamW, constant lr; TRL's gradient checkpointing off."
                if args.bf16
                else " Full fine-tuning, float32, AdamW, constant lr; TRL's gradient checkpointing and bf16 defaults "
                "switched off."
            )
            + " Throughput over steps 2..N, peak memory = "
            f"{'CUDA max allocated' if info['gpu'] != 'none' else 'peak RSS'} of the run's own process; medians "
            f"over {max((len(v.get('ours', [])) for k, v in run['raw'].items() if k != 'matmul'), default=0)} "
            "interleaved repetitions (column `reps`), ratios = median of per-repetition ours/TRL."
            + (
                f" Assembled with `--assemble` from the finished runs of an interrupted `--reps {args.reps}` run."
                if args.assemble
                else ""
            )
            + (
                (
                    " DPO reference log-probs: both sides compute them in one pass before training (TRL "
                    "`precompute_ref_log_probs=True`), outside steps 2..N, inside the whole call."
                    if args.trl_precompute_ref
                    else " DPO reference log-probs: ours computes them in one pass before training (outside steps 2..N, "
                    "inside the whole call); TRL (its default) runs a reference forward at every step, inside steps "
                    "2..N: compare the whole-call times too, or rerun with `--trl-precompute-ref`."
                )
                if "dpo" in run["stages"]
                else ""
            ),
            "",
            report(run, summary, args, model_dir),
        ]
    )
    if args.smoke:  # the tiny model's ratios say whether a change moved them, not how fast anything is
        print(report(run, summary, args, model_dir))
        return
    write_section(key, body, Path(args.out))
    print(body)


def smoke_defaults(args: argparse.Namespace) -> None:
    """Fill in `--reps` and `--stages`: the full defaults, or with `--smoke` the tiny model, one repetition and
    every pair whose TRL venv exists (the PPO pair needs TRL 1.12's, `bench/.venv-trl-ppo`)."""
    if not args.smoke:
        args.reps = args.reps or 3
        args.stages = args.stages or "sft,rm,dpo,ppo,rloo"
        return
    args.model, args.reps = "tiny", args.reps or 1
    have_ppo_venv = (VENV_TRL_PPO / "bin" / "python").is_file()
    args.stages = args.stages or "sft,rm,dpo," + ("ppo," if have_ppo_venv else "") + "rloo,grpo_cf,rloo_cf"


if __name__ == "__main__":
    main()
