"""The tiny base model, the policy with its value head, and the reward model: same numbers as plain transformers,
exact save/load, last-real-token scoring."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rlhf_core.inference import load_policy
from rlhf_core.models import (
    VALUE_HEAD_FILE,
    PolicyWithValueHead,
    disable_dropout,
    last_token_index,
    load_reward_model,
    reward_model_from_causal_lm,
    score_sequences,
)
from rlhf_core.tiny import create_tiny_base
from rlhf_core.tokenization import collate_right_padded, encode_prompt_response, left_pad_prompts

ROWS = [
    ("Where is my order?", "It shipped yesterday."),
    ("I was charged twice for one subscription.", "Sorry about that, I refunded the duplicate charge."),
    ("Hi", "Hello!"),
]


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    pairs = [encode_prompt_response(tiny_tokenizer, p, r) for p, r in ROWS]
    return pairs, collate_right_padded(pairs, tiny_tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return PolicyWithValueHead.from_pretrained(tiny_model_dir).eval()


def test_tiny_base_is_deterministic(tmp_path):
    # Given two builds with the same seed and one with another seed
    first = create_tiny_base(tmp_path / "a", seed=3)
    second = create_tiny_base(tmp_path / "b", seed=3)
    other = create_tiny_base(tmp_path / "c", seed=4)
    # Then the same seed gives byte-identical files and another seed other weights (same tokenizer)
    names = sorted(p.name for p in first.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_tiny_base_config_carries_special_tokens(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for cfg in (model.config, model.generation_config):
        assert cfg.pad_token_id == tiny_tokenizer.pad_token_id
        assert cfg.eos_token_id == tiny_tokenizer.eos_token_id
        assert cfg.bos_token_id == tiny_tokenizer.bos_token_id
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.config.attention_dropout == 0.0


def test_wrapper_logits_equal_plain_transformers_logits(tiny_model_dir, policy, batch):
    # Given the same weights loaded into the wrapper and into a plain transformers model
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    _, b = batch
    with torch.no_grad():
        logits, values = policy(b["input_ids"], b["attention_mask"])
        expected = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        hidden = plain.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    # Then on every real token the actor is the plain model and values are the value head on the final hidden
    # state (right pads differ only by their position id, which nothing real attends to)
    real = b["attention_mask"].bool()
    assert torch.equal(logits[real], expected[real])
    assert values.shape == b["input_ids"].shape and values.dtype == torch.float32
    torch.testing.assert_close(values[real], policy.value_head(hidden).squeeze(-1)[real], atol=1e-6, rtol=0)


def test_wrapper_gives_same_outputs_for_left_and_right_padding(policy, batch):
    pairs, right = batch
    left_ids, left_mask = left_pad_prompts([p.prompt_ids + p.response_ids for p in pairs], pad_id=0)
    with torch.no_grad():
        logits_r, values_r = policy(right["input_ids"], right["attention_mask"])
        logits_l, values_l = policy(left_ids, left_mask)
    for i in range(len(pairs)):
        real_r, real_l = right["attention_mask"][i].bool(), left_mask[i].bool()
        torch.testing.assert_close(values_l[i][real_l], values_r[i][real_r], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits_l[i][real_l], logits_r[i][real_r], atol=1e-5, rtol=0)


def test_save_then_load_is_bit_identical_and_plain_hf_loadable(policy, tmp_path):
    # When the policy is saved and loaded back
    out = policy.save_pretrained(tmp_path / "policy")
    loaded = PolicyWithValueHead.from_pretrained(out)
    # Then every tensor, value head included, is bit-identical
    before, after = policy.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    # And the directory is a plain causal-LM checkpoint plus the value head file
    assert sorted(load_file(out / VALUE_HEAD_FILE)) == ["bias", "weight"]
    plain = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in policy.pretrained_model.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name


def test_fresh_value_head_is_seeded_small_and_float32_under_bf16(tiny_model_dir):
    a = PolicyWithValueHead.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, seed=1)
    b = PolicyWithValueHead.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16, seed=1)
    c = PolicyWithValueHead.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, seed=2)
    assert next(a.pretrained_model.parameters()).dtype == torch.bfloat16
    assert a.value_head.weight.dtype == torch.float32
    assert torch.equal(a.value_head.weight, b.value_head.weight)
    assert not torch.equal(a.value_head.weight, c.value_head.weight)
    assert a.value_head.weight.abs().max() < 0.1 and torch.count_nonzero(a.value_head.bias) == 0
    with torch.no_grad():
        _, values = a(torch.tensor([[1, 5, 6]]))
    assert values.dtype == torch.float32


def test_peft_body_runs_and_saves_merged(tiny_model_dir, batch, tmp_path):
    # Given a LoRA-wrapped body whose adapters are non-zero
    body = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(body, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.1
    policy = PolicyWithValueHead(lora).eval()
    _, b = batch
    with torch.no_grad():
        logits, values = policy(b["input_ids"], b["attention_mask"])
    # When saved, then the directory holds the merged model: plain transformers reproduces the LoRA logits
    out = policy.save_pretrained(tmp_path / "lora_policy")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    real = b["attention_mask"].bool()
    torch.testing.assert_close(merged_logits[real], logits[real], atol=1e-5, rtol=0)
    assert values.shape == b["input_ids"].shape
    assert any("lora_B" in name for name, _ in policy.named_parameters())  # the live adapter is untouched


def test_reward_model_shares_the_body_and_has_a_seeded_head(tiny_model_dir):
    causal = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rm = reward_model_from_causal_lm(tiny_model_dir, seed=0)
    again = reward_model_from_causal_lm(tiny_model_dir, seed=0)
    for name, tensor in causal.model.state_dict().items():
        assert torch.equal(tensor, rm.model.state_dict()[name]), name
    assert rm.score.weight.shape == (1, causal.config.hidden_size)
    assert torch.equal(rm.score.weight, again.score.weight)
    assert rm.config.pad_token_id == causal.config.pad_token_id


def test_reward_model_scores_the_last_real_token(tiny_model_dir, batch):
    rm = reward_model_from_causal_lm(tiny_model_dir).eval()
    pairs, b = batch
    with torch.no_grad():
        scores = score_sequences(rm, b["input_ids"], b["attention_mask"])
        # Then each score equals the HF score of the sequence alone (no padding anywhere)
        alone = torch.cat([rm(input_ids=torch.tensor([p.prompt_ids + p.response_ids])).logits[:, 0] for p in pairs])
    assert scores.shape == (len(pairs),) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)


def test_reward_model_scores_the_real_eos_when_pad_equals_eos(tiny_model_dir, tiny_tokenizer, batch):
    rm = reward_model_from_causal_lm(tiny_model_dir).eval()
    pairs, _ = batch
    with torch.no_grad():
        # Reference: HF's score of each unpadded sequence while pad (<|pad|>) != eos, i.e. of its final EOS
        alone = torch.cat([rm(input_ids=torch.tensor([p.prompt_ids + p.response_ids])).logits[:, 0] for p in pairs])
    # Given a right-padded batch whose pad id is the EOS id that ends every response
    eos = tiny_tokenizer.eos_token_id
    rm.config.pad_token_id = eos
    b = collate_right_padded(pairs, pad_id=eos)
    with torch.no_grad():
        scores = score_sequences(rm, b["input_ids"], b["attention_mask"])
        hf_pooled = rm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0]
    # Then our score is still that of the final EOS, while HF's pad search lands on the token before it
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(hf_pooled, alone, atol=1e-3)


def test_saved_reward_model_loads_with_identical_scores(tiny_model_dir, batch, tmp_path):
    rm = reward_model_from_causal_lm(tiny_model_dir).eval()
    rm.save_pretrained(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm").eval()
    _, b = batch
    with torch.no_grad():
        assert torch.equal(
            score_sequences(rm, b["input_ids"], b["attention_mask"]),
            score_sequences(loaded, b["input_ids"], b["attention_mask"]),
        )


def test_last_token_index_for_either_padding_side():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 0]


def test_disable_dropout_makes_training_mode_forward_deterministic():
    # Given a model with dropout everywhere (GPT-2 from config, offline) in training mode
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    # When dropout is disabled, then two passes agree and the config records it
    disable_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0


def test_reward_model_refuses_a_directory_whose_body_weights_are_missing(tiny_model_dir, tmp_path) -> None:
    """Given a causal-LM directory whose config asks for one more layer than its weights hold, when a reward
    model is built from it, then it fails naming the missing weights (not a silently random-init body)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"model\.layers\.{config['num_hidden_layers'] - 1}\..*causal-LM"):
        reward_model_from_causal_lm(broken)


# --------------------------------------------------------------------------------------------------------------
# Safetensors only: pickle weights can run code when unpickled
# --------------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pickle_only_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights as `pytorch_model.bin` (pickle) and no safetensors file."""
    directory = tmp_path_factory.mktemp("pickle_only") / "model"
    shutil.copytree(tiny_model_dir, directory)
    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    torch.save(state, directory / "pytorch_model.bin")
    for path in directory.glob("*.safetensors"):
        path.unlink()
    return directory


def _train_sft_on(model_dir: Path, output_dir: Path) -> None:
    from rlhf_core.trainers.sft import SFTConfig, train_sft

    rows = [{"prompt": "Hi", "response": "Hello"}]
    train_sft(SFTConfig(max_steps=1, batch_size=1), model_dir, rows, [], output_dir)


@pytest.mark.parametrize(
    "load",
    [
        lambda path: AutoModelForCausalLM.from_pretrained(path, use_safetensors=True),  # what the library asks
        lambda path: load_policy(path),
        lambda path: load_reward_model(path),
        lambda path: reward_model_from_causal_lm(path),
        lambda path: PolicyWithValueHead.from_pretrained(path),
    ],
    ids=["transformers", "load_policy", "load_reward_model", "reward_model_from_causal_lm", "policy_with_value_head"],
)
def test_model_loaders_refuse_a_directory_with_only_pickle_weights(pickle_only_dir: Path, load) -> None:  # noqa: ANN001
    """Given a model directory whose weights are only `pytorch_model.bin`, then every loader refuses it."""
    with pytest.raises(OSError, match="safetensors"):
        load(pickle_only_dir)


def test_the_sft_trainer_refuses_a_directory_with_only_pickle_weights(pickle_only_dir: Path, tmp_path: Path) -> None:
    """Given pickle-only weights as the base model, then SFT refuses to start (nothing is unpickled)."""
    with pytest.raises(OSError, match="safetensors"):
        _train_sft_on(pickle_only_dir, tmp_path / "out")


def _model_loads(root: Path) -> list[tuple[str, int, bool]]:
    """(file, line, passes use_safetensors=True) of every `AutoModel*.from_pretrained(...)` call under `root`."""
    calls = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = node.func if isinstance(node, ast.Call) else None
            if not (
                isinstance(func, ast.Attribute)
                and func.attr == "from_pretrained"
                and isinstance(func.value, ast.Name)
                and func.value.id.startswith("AutoModel")
            ):
                continue
            safe = any(
                k.arg == "use_safetensors" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            calls.append((str(path.relative_to(REPO)), node.lineno, safe))
    return calls


def test_every_model_load_in_the_library_and_tasks_is_safetensors_only() -> None:
    """Given the source of rlhf_core/ and tasks/, then every `AutoModel*.from_pretrained` passes
    `use_safetensors=True` (the trainers used to load the SFT model and the frozen reference without it)."""
    calls = _model_loads(REPO / "rlhf_core") + _model_loads(REPO / "tasks")
    assert len(calls) >= 8
    assert [(path, line) for path, line, safe in calls if not safe] == []
