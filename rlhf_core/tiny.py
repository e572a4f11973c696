"""A tiny Llama-architecture model and a BPE tokenizer trained locally: the offline default of the pipeline.

Nothing here touches a model hub. `create_tiny_base(dir)` writes a Hugging Face model directory (safetensors
weights, config, generation config, tokenizer with a ChatML-like chat template) that every stage can load with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, exactly like a real checkpoint.

Special tokens:

- `<|pad|>`       padding only, never predicted (distinct from EOS, so masks can't confuse the two);
- `<|im_start|>`  opens a chat turn; doubles as the BOS token (the template writes it, nothing is prepended);
- `<|im_end|>`    closes a chat turn; it is the EOS token, so an assistant turn that ends stops generation.

The chat template renders `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message and, with
`add_generation_prompt=True`, a trailing `<|im_start|>assistant\\n`.

Everything is deterministic: the same corpus and seed give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Used only when the bundled task (`rlhf_core.support_bot`) is not importable. Small on purpose: the tokenizer
# needs to see the alphabet and common words of the task, not to model English.
_FALLBACK_CORPUS = [
    "Hello, I ordered a laptop last week and it still has not arrived.",
    "I'm sorry to hear that. Could you share your order number so I can check the shipping status?",
    "My package arrived damaged. The screen is cracked.",
    "Thank you for letting us know. I can arrange a replacement or a full refund, whichever you prefer.",
    "How do I reset my password?",
    "Click 'Forgot password' on the sign-in page and follow the link we email you.",
    "I was charged twice for the same subscription.",
    "I apologize for the double charge. I have issued a refund for the duplicate payment.",
    "Can I change the delivery address of my order?",
    "Yes, as long as the order has not shipped. Please send me the new address.",
    "The app keeps crashing when I open my account settings.",
    "Please update the app to the latest version and restart your phone; if it still crashes, tell me.",
    "What is your return policy?",
    "You can return any item within 30 days of delivery for a full refund.",
    "This is the worst service I have ever had.",
    "I understand your frustration, and I want to fix this for you right away.",
    "Do you ship internationally?",
    "We ship to most countries; shipping costs and times are shown at checkout.",
    "Thanks, that solved my problem!",
    "You're welcome! Is there anything else I can help you with today?",
]


def _default_corpus() -> list[str]:
    """The bundled task's text when it is available (`support_bot.tokenizer_corpus()`), else the fallback."""
    try:
        from rlhf_core import support_bot
    except ImportError:
        return list(_FALLBACK_CORPUS)
    corpus_fn = getattr(support_bot, "tokenizer_corpus", None)
    return list(corpus_fn()) if callable(corpus_fn) else list(_FALLBACK_CORPUS)


def _chat_lines(corpus: list[str]) -> list[str]:
    """The corpus rendered as chat turns, so frequent template pieces ('assistant\\n', 'user\\n') become merges."""
    roles = ("user", "assistant")
    return [f"{BOS_TOKEN}{roles[i % 2]}\n{text}{EOS_TOKEN}\n" for i, text in enumerate(corpus)]


def train_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a HF fast tokenizer with a chat template.

    Byte-level means every string round-trips (`decode(encode(s)) == s`) with no unknown token. `vocab_size`
    counts the 256 byte symbols, the 3 special tokens and the merges; a small corpus may stop short of it.
    """
    texts = list(corpus)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts + _chat_lines(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama with the tokenizer's vocabulary and special-token ids, dropout 0.

    Initialisation draws from a forked RNG seeded with `seed`, so the caller's global RNG is untouched and the
    same seed gives identical weights.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model.eval()


def create_tiny_base(output_dir: str | Path, corpus: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Train the tokenizer, build the model and save both (safetensors) into `output_dir`; returns the path.

    `corpus=None` uses the bundled support-bot text (or a small built-in fallback when it is unavailable).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(_default_corpus() if corpus is None else corpus)
    model = build_tiny_model(tokenizer, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
