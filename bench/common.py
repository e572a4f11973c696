"""Shared helpers of the benchmarks: model preparation, the bundled task's rows, machine facts, and writing a
section of `bench/RESULTS.md`."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = HERE / "models"
SMOLLM2_DIR = MODELS / "smollm2-135m-instruct"
TINY_DIR = MODELS / "tiny"
RESULTS = HERE / "RESULTS.md"
DATA_DIR = ROOT / "data" / "support_bot"

# Runs from a checkout without `pip install -e .`.
sys.path.insert(0, str(ROOT))


def base_model(name: str) -> Path:
    """The base causal LM directory of `--model tiny|smollm2` (the tiny one is created on first use)."""
    if name == "tiny":
        if not (TINY_DIR / "config.json").is_file():
            from rlhf_core.tiny import create_tiny_base

            create_tiny_base(TINY_DIR, seed=0)
        return TINY_DIR
    if name == "smollm2":
        if not (SMOLLM2_DIR / "config.json").is_file():
            raise SystemExit(f"{SMOLLM2_DIR} is missing: run `python bench/smollm2.py prepare` first")
        return SMOLLM2_DIR
    raise SystemExit(f"unknown model {name!r} (tiny|smollm2)")


def initial_reward_model(base: Path) -> Path:
    """A reward model initialised from `base` (new seeded score head), saved once beside it with its tokenizer:
    the frozen RM and TRL's value-model initialisation in the speed benchmark."""
    from transformers import AutoTokenizer

    from rlhf_core.models import reward_model_from_causal_lm

    out = base.with_name(f"{base.name}-rm-init")
    if not (out / "config.json").is_file():
        reward_model_from_causal_lm(base, seed=0).save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def task_rows(data_dir: Path = DATA_DIR) -> dict[str, list[dict]]:
    """The bundled support-bot task as canonical rows: `sft` (prompt, response), `prefs` (prompt, chosen,
    rejected), `prompts` and `eval_prompts` (prompt)."""
    files = {
        "sft": "demonstrations.jsonl",
        "prefs": "preferences.jsonl",
        "prompts": "prompts_train.jsonl",
        "eval_prompts": "prompts_eval.jsonl",
    }
    missing = [name for name in files.values() if not (data_dir / name).is_file()]
    if missing:
        raise SystemExit(
            f"{data_dir} lacks {missing}: regenerate with `python -m rlhf_core.support_bot --out {data_dir}`"
        )
    return {key: read_jsonl(data_dir / name) for key, name in files.items()}


# --------------------------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------------------------


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _ram_gib() -> float:
    with open("/proc/meminfo") as f:
        kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return kib / 2**20


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU (if any), OS and Python."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": _lscpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_ram_gib(), 1),
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions(python: str | Path = sys.executable) -> dict[str, str]:
    """Package versions as seen by the interpreter `python`."""
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        "for p in ('torch', 'transformers', 'accelerate', 'peft', 'datasets', 'trl'):\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------------------------------------------
# RESULTS.md sections
# --------------------------------------------------------------------------------------------------------------


def write_section(key: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the block between `<!-- KEY:start -->` and `<!-- KEY:end -->` in `path`."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
