"""Policy with a value head, the reward model, and how both are loaded and saved.

    PolicyWithValueHead
    ├── pretrained_model   any causal LM (or a peft-wrapped one): shared body + LM head (the actor)
    └── value_head         nn.Linear(hidden, 1) in float32 on the final hidden state (the critic)

One forward pass returns both heads: `logits [batch, L, V]` and `values [batch, L]`, where `values[:, t]` is the
value of the state that ends at token t (so `V(s_t)` of response token t sits at the column before it, see
`logprobs.response_forward`).

On disk a policy is a plain Hugging Face causal-LM directory (safetensors) plus `value_head.safetensors`, so
`AutoModelForCausalLM.from_pretrained(dir)` loads the actor with nothing of ours installed.

The reward model is an `AutoModelForSequenceClassification` with one label. `score_sequences` picks the score of
the last real token itself, from the attention mask, because HF's pooling searches for the last token that is not
`pad_token_id` and so skips a real EOS whenever pad == EOS (docs/pitfalls.md §4).

All loads use safetensors only and `trust_remote_code=False` unless the caller opts in.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import logging as hf_logging

from rlhf_core.tokenization import position_ids_from_attention_mask

VALUE_HEAD_FILE = "value_head.safetensors"


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a plain body must not need it
        return False
    return isinstance(model, PeftModel)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if _is_peft(model) else model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (modules and config), in place; returns the model.

    RLHF compares log-probs of the same tokens across passes; dropout would make that ratio noise (docs/pitfalls.md §6).
    Attention dropout is a float attribute of the attention modules in HF models, not an `nn.Dropout`.
    """
    configs = {}
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            configs[id(config)] = config
    # The config too, so a saved model (and anything rebuilt from it) stays dropout-free.
    for config in configs.values():
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    return model


def _hidden_size(model: nn.Module) -> int:
    config = unwrap_peft(model).config
    return config.get_text_config().hidden_size


class PolicyWithValueHead(nn.Module):
    """A causal LM and a scalar value head sharing its body (the PPO actor-critic)."""

    def __init__(self, pretrained_model: nn.Module, value_head: nn.Linear | None = None, seed: int = 0) -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        if value_head is None:
            value_head = nn.Linear(_hidden_size(pretrained_model), 1, dtype=torch.float32)
            # Small weights: initial values ≈ 0, so early value-loss gradients don't shake the shared body.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nn.init.normal_(value_head.weight, std=0.01)
            nn.init.zeros_(value_head.bias)
        self.value_head = value_head.float()

    @property
    def config(self) -> Any:
        return unwrap_peft(self.pretrained_model).config

    @property
    def generation_config(self) -> Any:
        return unwrap_peft(self.pretrained_model).generation_config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits [batch, L, V], values [batch, L] float32)` from one pass through the body.

        Without `position_ids` they are derived from `attention_mask`, so left-padded batches are scored right.
        `logits_to_keep > 0` computes logits for the last that many positions only (values stay `[batch, L]`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_attention_mask(attention_mask)
        out = self.pretrained_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        hidden = out.hidden_states[-1]  # [batch, L, hidden], after the final norm: what the LM head sees
        values = self.value_head(hidden.float()).squeeze(-1)
        return out.logits, values

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        value_head_path: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> PolicyWithValueHead:
        """Load the causal LM at `path` and the value head from `value_head_path`, else `path/value_head.safetensors`,
        else a fresh one (seeded by `seed`). `torch_dtype=` is accepted as an alias of `dtype`."""
        dtype = kwargs.pop("torch_dtype", dtype)
        body = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
        )
        head_file = Path(value_head_path) if value_head_path is not None else Path(path) / VALUE_HEAD_FILE
        if value_head_path is None and not head_file.exists():
            return cls(body, seed=seed)
        state = load_file(head_file)
        head = nn.Linear(state["weight"].shape[1], 1, dtype=torch.float32)
        head.load_state_dict(state)
        return cls(body, value_head=head)

    def save_pretrained(self, output_dir: str | Path, **_: Any) -> Path:
        """Write the causal LM in plain HF layout (safetensors) plus `value_head.safetensors`.

        A peft body is saved merged (a copy is merged, the live adapter is untouched), so the directory loads with
        `AutoModelForCausalLM.from_pretrained` alone. Extra keyword arguments (`safe_serialization=…`, as HF's
        `save_pretrained` takes) are accepted and ignored: this always writes safetensors.
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        body = self.pretrained_model
        if _is_peft(body):
            body = copy.deepcopy(body).merge_and_unload()
        body.save_pretrained(out, safe_serialization=True)
        head = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(head, str(out / VALUE_HEAD_FILE), metadata={"format": "pt"})
        return out


def load_reward_model(
    path: str | Path, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False, **kwargs: Any
) -> PreTrainedModel:
    """A saved reward model: `AutoModelForSequenceClassification` with one label, safetensors only.

    A normalised reward model (`RewardConfig.normalize_rewards`) carries `score.bias` and `config.reward_offset`;
    Llama-style classifiers build a bias-free `score` and would silently drop that bias, so the head is rebuilt
    with one and the saved bias restored.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )
    _restore_score_bias(model, Path(path))
    _ensure_pad_token_id(model)
    return model


def _restore_score_bias(model: PreTrainedModel, path: Path) -> None:
    offset = getattr(model.config, "reward_offset", None)
    head = getattr(model, "score", None)
    if offset is None or not isinstance(head, nn.Linear) or head.bias is not None:
        return
    bias = None
    for shard in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        with safe_open(str(shard), framework="pt") as f:
            if "score.bias" in f.keys():
                bias = f.get_tensor("score.bias")
    if bias is None:  # saved by a tool that kept only the offset: the head had no bias before normalising
        bias = torch.full((head.out_features,), -float(offset))
    biased = nn.Linear(
        head.in_features, head.out_features, bias=True, dtype=head.weight.dtype, device=head.weight.device
    )
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(bias.to(biased.bias))
    model.score = biased


def reward_model_from_causal_lm(
    causal_lm_path: str | Path,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    **kwargs: Any,
) -> PreTrainedModel:
    """A reward model initialised from a causal LM (usually the SFT model): same body, new scalar head.

    The LM head is dropped; the score head `Linear(hidden, 1)` is freshly initialised from a forked RNG seeded with
    `seed` (the same seed gives the same head, the caller's RNG is untouched).
    """
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            causal_lm_path,
            num_labels=1,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            output_loading_info=True,
            **kwargs,
        )
    # A new `score` head and a dropped LM head are the point; any other missing weight means the directory is not
    # a causal LM of this architecture, and a body trained from random init would fail silently.
    missing = sorted(k for k in info["missing_keys"] if not k.split(".")[0] == "score")
    if missing:
        raise ValueError(
            f"{causal_lm_path}: weights {missing[:5]} missing for a reward model of this architecture "
            f"({len(missing)} in all); is it a causal-LM directory?"
        )
    _ensure_pad_token_id(model)
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report for a load whose missing/unexpected keys we check ourselves."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _ensure_pad_token_id(model: PreTrainedModel) -> None:
    """HF's own pooling needs `pad_token_id` for batches > 1; fall back to EOS (`score_sequences` needs neither)."""
    config = model.config
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos


def _score_head(reward_model: nn.Module) -> nn.Module:
    inner = unwrap_peft(reward_model)
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(inner).__name__} has no `score` or `classifier` head")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row, `[batch, L]` → `[batch]`, for left or right padding."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * columns).argmax(-1)


def score_sequences(reward_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each sequence: the score head on the last real token's hidden state, `[batch]` float32.

    The last real token comes from `attention_mask` (either padding side), never from a search for pad ids, so a
    final EOS that equals the pad token is the token scored. Position ids follow the attention mask too.
    """
    out = reward_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_attention_mask(attention_mask),
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = out.hidden_states[-1]  # [batch, L, hidden]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last_hidden = hidden[rows, last_token_index(attention_mask)]  # [batch, hidden]
    return _score_head(reward_model)(last_hidden).squeeze(-1).float()


class PolicyAndCritic(nn.Module):
    """Actor and critic with separate bodies: the policy LM and a critic that starts as the reward model.

    The critic's score head is read at every position, `V(s) = w·h_s (+ b)`, so at the last token it starts out
    equal to the RM score — a better initial value estimate than a fresh head.
    """

    def __init__(self, pretrained_model: nn.Module, critic: nn.Module) -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        self.critic = critic

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits [batch, L, V], values [batch, L] float32)`, as `PolicyWithValueHead.forward` (logits of the
        last `logits_to_keep` positions only when > 0)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_attention_mask(attention_mask)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }
        logits = self.pretrained_model(**inputs, logits_to_keep=logits_to_keep).logits
        # The backbone alone: the classifier's own forward would pool one position per row.
        hidden = self.critic.base_model(**inputs).last_hidden_state  # [batch, L, hidden], after the final norm
        values = self.critic.score(hidden).squeeze(-1).float()
        return logits, values

    def save_pretrained(self, output_dir: str | Path, **_: Any) -> Path:
        """The policy in plain HF causal-LM layout (LoRA merged into a copy) and the critic in `critic/`."""
        out = Path(output_dir)
        body = self.pretrained_model
        if _is_peft(body):
            body = copy.deepcopy(body).merge_and_unload()  # the live adapters stay
        body.save_pretrained(out, safe_serialization=True)
        self.critic.save_pretrained(out / "critic", safe_serialization=True)
        return out
