"""Decode throughput: our sampler (`rlhf_core.generation.sample`) against transformers' `generate`, and both
against the matmul-bound limit of this machine.

    python bench/decode.py --model smollm2                 # batch 16, 64 new tokens, 3 interleaved repetitions
    python bench/decode.py --model tiny --reps 1 --no-write # a quick look, nothing written

Every variant decodes the same left-padded batch of bundled prompts (`prompts_eval.jsonl`, chat template) for
exactly `--new-tokens` tokens (no EOS stops a row, so every variant does the same work) at the pipeline's
evaluation sampling (temperature 0.7, top-p 0.9). Rate = batch × new tokens / wall seconds of the whole call,
prompt prefill included. Variants run interleaved (A B C D, A B C D, ...) so a noisy neighbour hurts all alike.

The limits. Matmul-bound: the call's FLOPs (the prefill of the padded prompts, then per decoded token 2·N_matmul
for every projection and the LM head plus attention, 2·2·L·d_attn per layer over the L keys in the cache) at the
measured `torch.matmul` peak (float32, and bfloat16 for the bf16 variants). Weight-streaming: each decode step
reads every matmul weight once for the whole batch, at the measured read bandwidth (prefill not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from common import DATA_DIR, HERE, RESULTS, base_model, machine, markdown_table, read_jsonl, utc_now, write_section
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlhf_core.generation as generation
from rlhf_core.generation import SamplingConfig, _eos_token_ids, filter_logits, sample
from rlhf_core.tokenization import encode_prompt, left_pad_prompts, padding_id

TEMPERATURE, TOP_P = 0.7, 0.9


def matmul_peak(dtype: torch.dtype, n: int = 1024, iters: int = 10, rounds: int = 3) -> float:
    """Best-of-`rounds` FLOP/s of `torch.matmul` on two n×n matrices of `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
    return best


def read_bandwidth(gib: float = 1.0, rounds: int = 5) -> float:
    """Best-of-`rounds` bytes/s of reading a `gib`-GiB float32 tensor once (`sum`): the rate weights stream in."""
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start))
    return best


def call_flops(config, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, int]:
    """Forward FLOPs of one call, and N_matmul: prefill of `batch` padded prompts of `prompt_len` tokens (the LM head
    only at the last position, as the sampler asks), then `batch × new_tokens` decoded tokens."""
    d, layers, ff, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d_attn = heads * head_dim
    body = layers * (d * d_attn + 2 * d * kv * head_dim + d_attn * d + 3 * d * ff)
    n_matmul = body + d * vocab
    prefill = batch * (2 * body * prompt_len + 2 * layers * prompt_len**2 * d_attn + 2 * d * vocab)
    mean_context = prompt_len + new_tokens / 2
    decode = batch * new_tokens * (2 * n_matmul + 4 * layers * mean_context * d_attn)
    return prefill + decode, n_matmul


def variants(model, prompt_ids, prompt_mask, new_tokens: int, pad_id: int, eos_ids: list[int]) -> dict:
    """name → (precision, zero-argument call that decodes the batch)."""
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=TEMPERATURE, top_p=TOP_P, seed=0)

    def ours():
        # No EOS ends a row: every variant decodes exactly `new_tokens` per row.
        return sample(model, prompt_ids, prompt_mask, config, [], pad_id)

    def hf():
        return model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            top_k=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
        )

    def ours_before():
        # The sampler before 2026-12-06: top-p by sorting the whole vocabulary, then a draw over all of it.
        window = generation.candidate_logits
        generation.candidate_logits = lambda logits, t, k, p: (filter_logits(logits, t, k, p), None)
        try:
            return ours()
        finally:
            generation.candidate_logits = window

    return {
        "ours fp32, before (whole-vocabulary sort + multinomial)": ("fp32", ours_before),
        "ours fp32": ("fp32", ours),
        "transformers generate fp32": ("fp32", hf),
        "ours bf16, before": ("bf16", ours_before),
        "ours bf16": ("bf16", ours),
        "transformers generate bf16": ("bf16", hf),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing into RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    model_dir = base_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    pad_id = padding_id(tokenizer)
    prompts = [row["prompt"] for row in read_jsonl(DATA_DIR / "prompts_eval.jsonl")[: args.batch]]
    prompt_ids, prompt_mask = left_pad_prompts([encode_prompt(tokenizer, p) for p in prompts], pad_id)
    runs = variants(model, prompt_ids, prompt_mask, args.new_tokens, pad_id, _eos_token_ids(model, tokenizer))

    def timed(precision: str, call) -> float:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        with torch.no_grad(), context:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

    for precision, call in runs.values():  # warm-up: first-call allocations and one-off kernel choices
        timed(precision, call)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, (precision, call) in runs.items():
            seconds[name].append(timed(precision, call))
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    bandwidth = read_bandwidth()

    tokens = args.batch * args.new_tokens
    flops, n_matmul = call_flops(model.config, args.batch, prompt_mask.shape[1], args.new_tokens)
    # "vs before": each precision against the old sampler in the same precision
    baseline = {p: statistics.median(seconds[n]) for n, (p, _) in runs.items() if "before" in n}
    rows, raw = [], {}
    for name, (precision, _) in runs.items():
        median = statistics.median(seconds[name])
        rate = tokens / median
        limit = tokens * peaks[precision] / flops
        # Every step reads each matmul weight once for the whole batch (bf16 under autocast: the cached bf16 copy).
        stream_limit = args.batch * bandwidth / (n_matmul * (2 if precision == "bf16" else 4))
        raw[name] = {"seconds": seconds[name], "tokens_per_s": rate}
        rows.append(
            [
                name,
                f"{rate:.0f}",
                f"{min(tokens / s for s in seconds[name]):.0f}–{max(tokens / s for s in seconds[name]):.0f}",
                f"{baseline[precision] / median:.2f}×",
                f"{limit:.0f}",
                f"{rate / limit:.0%}",
                f"{stream_limit:.0f}",
                f"{rate / stream_limit:.0%}",
            ]
        )
    table = markdown_table(
        [
            "variant",
            "tokens/s (median)",
            "spread",
            "vs before (same precision)",
            "matmul-bound limit",
            "of it",
            "weight-streaming limit",
            "of it",
        ],
        rows,
    )
    info = machine()
    command = f"python bench/decode.py --model {args.model} --batch {args.batch} --new-tokens {args.new_tokens} " + (
        f"--reps {args.reps}" + (f" --threads {args.threads}" if args.threads else "")
    )
    body = "\n".join(
        [
            f"### Decode throughput: {args.model} ({model_dir.name}), batch {args.batch}, {args.new_tokens} new tokens",
            "",
            f"`{command}` — {utc_now()}, {time.perf_counter() - started:.0f} s. Machine: {info['cpu']}, "
            f"{info['cores']} cores, GPU: {info['gpu']}; torch {torch.__version__}, torch threads "
            f"{torch.get_num_threads()}. Prompts: the first {args.batch} of `prompts_eval.jsonl` (longest "
            f"{prompt_mask.shape[1]} tokens, left-padded), temperature {TEMPERATURE}, top-p {TOP_P}, every row "
            f"decodes {args.new_tokens} tokens; {args.reps} interleaved repetitions after one warm-up each. bf16 = "
            "float32 weights under `torch.autocast('cpu', bfloat16)`, as `mixed_precision: bf16` runs the stages.",
            "",
            table,
            "",
            f"Matmul-bound limit: {flops / 1e9:.0f} GFLOP per call (prefill of {args.batch} × {prompt_mask.shape[1]} "
            f"prompt tokens, then {tokens} decoded tokens at 2·N_matmul each, N_matmul = {n_matmul / 1e6:.1f} M, "
            "plus attention) at the measured `torch.matmul` peak: "
            f"{peaks['fp32'] / 1e9:.0f} GFLOP/s float32, {peaks['bf16'] / 1e9:.0f} GFLOP/s bfloat16 (1024², best "
            "of 3×10). Weight-streaming limit: batch × the measured read bandwidth "
            f"({bandwidth / 1e9:.1f} GB/s, `sum` of 1 GiB, best of 5) ÷ the bytes of the matmul weights read per step "
            f"({n_matmul * 4 / 1e6:.0f} MB float32, {n_matmul * 2 / 1e6:.0f} MB as autocast's bf16 copies).",
        ]
    )
    print(body)
    if args.no_write:
        return
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    key = f"decode-{args.model}"
    (results / f"{key}.json").write_text(
        json.dumps(
            {"args": vars(args), "peaks": peaks, "flops_per_call": flops, "raw": raw, "read_bandwidth": bandwidth},
            indent=1,
        )
    )
    write_section(key, body, RESULTS)


if __name__ == "__main__":
    main()
