"""What packing buys DPO: one micro-batch's forward + backward in each pair layout, at several micro-batch sizes.

    python bench/dpo_layouts.py --model smollm2                  # B = 4, 8, 16; 3 interleaved repetitions
    python bench/dpo_layouts.py --model tiny --reps 1 --no-write # a quick look, nothing written

Layouts (`rlhf_core.trainers.dpo.collate_pairs`), all giving the same log-probs to float rounding (checked here
on the first batch of each size):
- packed: the pairs end to end in one unpadded row under a block attention mask (`rlhf_core.packing`);
- kv-cache: prompts left-padded `[B, P]` once, both responses right-padded `[2B, R]` attending to the prompt's
  KV cache (`logprobs.shared_prompt_logprobs`);
- two sequences: chosen and rejected as whole right-padded sequences `[2B, L]`, the prompt twice.

Each timing is one `pair_logps` forward + `sum().backward()` over `B` consecutive bundled preference pairs; the
batches differ per repetition, the layouts run interleaved on the same batch. Reported: median seconds per
micro-batch, the layout's token slots (what the matmuls process, pads included) and the packed row's length N,
whose attention grows as N² (why `packing.MAX_PACKED_TOKENS` caps it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import DATA_DIR, HERE, base_model, machine, markdown_table, read_jsonl, utc_now, write_section
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_core.packing import MAX_PACKED_TOKENS
from rlhf_core.tokenization import padding_id
from rlhf_core.trainers.dpo import DPOConfig, collate_pairs, encode_preferences, pair_logps

LAYOUTS = {"packed": (True, True), "kv-cache": (True, False), "two sequences": (False, False)}
"""Layout name → `collate_pairs`' (share_prompt, pack)."""


def slots(batch: dict[str, torch.Tensor]) -> int:
    """Token positions the model runs over, pads included."""
    if "keep" in batch:
        return batch["input_ids"].numel()
    if "prompt_ids" in batch:
        return batch["prompt_ids"].numel() + batch["response_ids"].numel()
    return batch["input_ids"].numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    parser.add_argument("--sizes", default="4,8,16", help="micro-batch sizes (pairs)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    path = base_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    rows = read_jsonl(DATA_DIR / "preferences.jsonl")
    pairs = encode_preferences(tokenizer, rows, DPOConfig(max_prompt_len=None, max_response_len=None))
    pad, cpu = padding_id(tokenizer), torch.device("cpu")

    table, raw = [], {}
    for size in sizes:
        batches = [pairs[r * size : (r + 1) * size] for r in range(args.reps)]
        seconds = {name: [] for name in LAYOUTS}
        with torch.no_grad():  # the layouts agree before they are timed
            got = {
                name: torch.stack(pair_logps(model, collate_pairs(batches[0], pad, cpu, share, pack)))
                for name, (share, pack) in LAYOUTS.items()
            }
        worst = max(float((got[name] - got["two sequences"]).abs().max()) for name in LAYOUTS)
        for batch_pairs in batches:
            for name, (share, pack) in LAYOUTS.items():
                batch = collate_pairs(batch_pairs, pad, cpu, share, pack)
                start = time.perf_counter()
                chosen, rejected = pair_logps(model, batch)
                (chosen.sum() + rejected.sum()).backward()
                seconds[name].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        first = {name: collate_pairs(batches[0], pad, cpu, share, pack) for name, (share, pack) in LAYOUTS.items()}
        median = {name: statistics.median(v) for name, v in seconds.items()}
        n_packed = first["packed"]["input_ids"].shape[1] if "keep" in first["packed"] else None
        table.append(
            [
                size,
                n_packed if n_packed is not None else f"> {MAX_PACKED_TOKENS} (not packed)",
                " / ".join(str(slots(first[name])) for name in LAYOUTS),
                " / ".join(f"{median[name]:.2f}" for name in LAYOUTS),
                f"**{median['kv-cache'] / median['packed']:.2f}×**",
                f"{median['two sequences'] / median['packed']:.2f}×",
                f"{worst:.1e}",
            ]
        )
        raw[size] = {"seconds": seconds, "slots": {name: slots(first[name]) for name in LAYOUTS}, "max_diff": worst}
        print(table[-1], flush=True)

    info = machine()
    header = [
        "pairs B",
        "packed row N",
        "token slots packed / kv-cache / two seq.",
        "s per fwd+bwd packed / kv-cache / two seq.",
        "packed vs kv-cache",
        "packed vs two seq.",
        "max abs Δ log π",
    ]
    body = (
        f"### DPO pair layouts: {args.model}, forward + backward of one micro-batch\n\n"
        f"`python bench/dpo_layouts.py --model {args.model} --sizes {args.sizes} --reps {args.reps}` — {utc_now()}. "
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, float32. Medians of {args.reps} interleaved repetitions (a different batch "
        f"of bundled pairs each).\n\n" + markdown_table(header, table)
    )
    print(body)
    if not args.no_write:
        write_section(f"dpo-layouts-{args.model}", body)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"dpo-layouts-{args.model}.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
