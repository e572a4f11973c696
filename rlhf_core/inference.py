"""Use a trained policy: load it, sample text with nucleus sampling, chat over several turns.

Everything samples through `rlhf_core.generation` (the same sampler as PPO and evaluation) and renders prompts
through `rlhf_core.tokenization` (the same chat template the policy was trained on). The CLI (`flows/cli.py`)
wraps these functions; input and output of `chat_loop` are injectable so it runs in tests and notebooks too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.generation import SamplingConfig, generate
from rlhf_core.models import disable_dropout
from rlhf_core.tokenization import Conversation, Message

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def load_policy(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`(model, tokenizer)` of a saved policy: any Hugging Face causal-LM directory (SFT, DPO, or a PPO policy,
    whose `value_head.safetensors` is not part of the causal LM and is ignored). Eval mode, dropout off.
    Safetensors only; code shipped with the model runs only if the caller sets `trust_remote_code`."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = disable_dropout(model).eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def generate_text(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Conversation],
    sampling: SamplingConfig,
    batch_size: int = 8,
    max_prompt_len: int | None = None,
) -> list[str]:
    """One sampled response per prompt (a string or a list of `{"role", "content"}` messages), in order.

    Batches of `batch_size`; with `sampling.seed` set, batch k draws from seed + k, so the same call gives the
    same texts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts: list[str] = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        config = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + k)
        out = generate(model, tokenizer, list(prompts[start : start + batch_size]), config, max_prompt_len)
        texts.extend(out.texts)
    return texts


def chat_loop(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sampling: SamplingConfig,
    input_fn: Callable[[str], str] = input,
    output_fn: Callable[[str], None] = print,
    system_prompt: str | None = None,
    max_prompt_len: int | None = None,
) -> list[Message]:
    """An interactive chat: read a user turn with `input_fn`, answer with the policy, print with `output_fn`.

    The whole conversation (system prompt, every user and assistant turn) is the prompt of each answer, rendered
    with the chat template; `max_prompt_len` keeps its last tokens when it grows too long. `/reset` forgets the
    history, `/exit`, `/quit` or end of input (EOFError) ends the chat. Returns the history.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[Message] = list(system)
    while True:
        try:
            user = input_fn("you> ").strip()
        except EOFError:
            break
        if user in EXIT_COMMANDS:
            break
        if user == RESET_COMMAND:
            history = list(system)
            output_fn("(history cleared)")
            continue
        if not user:
            continue
        history.append({"role": "user", "content": user})
        reply = generate_text(model, tokenizer, [list(history)], sampling, max_prompt_len=max_prompt_len)[0].strip()
        history.append({"role": "assistant", "content": reply})
        output_fn(reply)
    return history
