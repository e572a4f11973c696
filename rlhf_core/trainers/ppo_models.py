"""The four models of PPO, loaded for training: the actor-critic (trained), the frozen reference and the frozen
reward model, with the SFT model's tokenizer. The model classes themselves live in `rlhf_core/models.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf_core.models import PolicyAndCritic, PolicyWithValueHead, disable_dropout, load_reward_model
from rlhf_core.trainers.setup import apply_lora, freeze, set_seed

if TYPE_CHECKING:
    from rlhf_core.trainers.ppo import PPOConfig


def build_actor_critic(config: PPOConfig, sft_model_path: str | Path, reward_model_path: str | Path) -> nn.Module:
    """The trained module: the SFT policy (with LoRA adapters if configured) and its critic (see the module
    docstring), dropout off, float32 master weights."""
    actor = disable_dropout(
        AutoModelForCausalLM.from_pretrained(sft_model_path, dtype=torch.float32, use_safetensors=True)
    )
    if config.lora is not None:
        actor = apply_lora(actor, config.lora)
    if config.critic == "shared":
        return PolicyWithValueHead(actor, seed=config.seed)
    critic = disable_dropout(load_reward_model(reward_model_path, dtype=torch.float32))
    return PolicyAndCritic(actor, critic)


def critic_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that only the critic uses (value head, or the separate critic's whole body)."""
    critic = model.value_head if isinstance(model, PolicyWithValueHead) else model.critic
    return list(critic.parameters())


@dataclass
class PPOModels:
    """The four models of PPO. Only `actor_critic` is trained."""

    tokenizer: PreTrainedTokenizerBase
    """The SFT model's tokenizer (the reward model must share its vocabulary and chat template)."""
    actor_critic: nn.Module
    """`PolicyWithValueHead` or `PolicyAndCritic`: forward → `(logits, values)`; `.pretrained_model` samples."""
    reference: nn.Module | None
    """Frozen π_ref (the SFT model); None with LoRA: the policy with its adapters disabled."""
    reward_model: nn.Module | None
    """Frozen `AutoModelForSequenceClassification` with one label (None: the reward is `reward_functions` only)."""


def _load_frozen(path: str | Path, reward: bool) -> nn.Module:
    model = (
        load_reward_model(path, dtype=torch.float32)
        if reward
        else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    )
    return freeze(disable_dropout(model))


def load_ppo_models(config: PPOConfig, sft_model_path: str | Path, reward_model_path: str | Path | None) -> PPOModels:
    """Load the tokenizer, the actor-critic to train, the frozen reference and the frozen reward model (all
    float32 on CPU, dropout off; the trainer moves them to its device). Seeds the global RNG (LoRA init)."""
    if config.uses_reward_model and reward_model_path is None:
        raise ValueError("reward_model_weight > 0 needs a reward model path")
    set_seed(config.seed)
    return PPOModels(
        tokenizer=AutoTokenizer.from_pretrained(sft_model_path),
        actor_critic=build_actor_critic(config, sft_model_path, reward_model_path),
        reference=None if config.lora is not None else _load_frozen(sft_model_path, reward=False),
        reward_model=_load_frozen(reward_model_path, reward=True) if config.uses_reward_model else None,
    )
