"""The pipeline config: given YAML (and CLI overrides), when validated, then stage configs are the core
dataclasses with their own defaults, bad keys are named by their dotted path, and overrides are typed."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from flows.config import ConfigError, PipelineConfig, apply_override, load_config, parse_config
from rlhf_core.generation import SamplingConfig
from rlhf_core.trainers.common import LoRAConfig
from rlhf_core.trainers.dpo import DPOConfig
from rlhf_core.trainers.ppo import PPOConfig
from rlhf_core.trainers.reward import RewardConfig
from rlhf_core.trainers.sft import SFTConfig

REPO = Path(__file__).resolve().parent.parent
DATA = {
    "demonstrations": {"path": "d.jsonl"},
    "preferences": {"path": "p.jsonl"},
    "prompts_train": {"path": "pt.jsonl"},
    "prompts_eval": {"path": "pe.jsonl"},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _errors(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.errors)


def test_stage_sections_are_the_core_dataclasses_with_their_own_defaults(tmp_path: Path) -> None:
    # Given a config that sets one SFT field and a LoRA rank only.
    path = _write(tmp_path, {"name": "t", "datasets": DATA, "sft": {"max_steps": 7, "lora": {"r": 4}}})

    cfg = load_config(path)

    # Then the sections are the rlhf_core dataclasses; every unset field is the dataclass's default.
    assert isinstance(cfg.sft, SFTConfig) and isinstance(cfg.dpo, DPOConfig)
    assert cfg.sft.max_steps == 7
    assert cfg.sft.lora == LoRAConfig(r=4)
    for f in fields(SFTConfig):
        if f.name not in ("max_steps", "lora"):
            assert getattr(cfg.sft, f.name) == getattr(SFTConfig(), f.name), f.name
    assert cfg.reward_model == RewardConfig()
    # ... except the sampling limits, which the pipeline resolves from the data (`auto`, docs/pitfalls.md).
    assert cfg.ppo == PPOConfig(max_new_tokens="auto")
    assert cfg.evaluation.sampling == SamplingConfig(max_new_tokens="auto")
    assert cfg.collect.sampling.max_new_tokens == "auto" and cfg.collect.max_prompt_len == "auto"


def test_pipeline_seed_is_every_stage_seed_unless_a_stage_sets_its_own(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"name": "t", "seed": 11, "datasets": DATA, "dpo": {"seed": 3}}))

    assert (cfg.sft.seed, cfg.reward_model.seed, cfg.ppo.seed, cfg.dpo.seed) == (11, 11, 11, 3)


@pytest.mark.parametrize(
    ("patch", "path", "message"),
    [
        ({"sft": {"max_stepz": 3}}, "sft.max_stepz", "unexpected key"),
        (
            {"datasets": {**DATA, "demonstrations": {"path": "d", "fromat": "trl"}}},
            "datasets.demonstrations.fromat",
            "unexpected key",
        ),
        ({"tracking": {"uri": "x"}}, "tracking.uri", "unexpected key"),
        ({"typo_top_level": 1}, "typo_top_level", "unexpected key"),
        ({"sft": {"max_steps": "many"}}, "sft.max_steps", "valid integer"),
        ({"dpo": {"dpo_beta": -1.0}}, "dpo", "dpo_beta must be > 0"),
        ({"algorithm": "reinforce"}, "algorithm", "'ppo', 'dpo', 'grpo' or 'rloo'"),
        ({"grpo": {"num_samples_per_prompt": 1}}, "grpo", "num_samples_per_prompt >= 2"),
        ({"evaluation": {"sampling": {"top_p": 2.0}}}, "evaluation.sampling", "top_p must be in (0, 1]"),
    ],
)
def test_a_bad_key_is_named_by_its_dotted_path(tmp_path: Path, patch: dict, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, {"name": "t", "datasets": DATA, **patch}))

    errors = _errors(exc)
    assert path in errors, errors
    assert message in errors[path]
    assert path in str(exc.value)


def test_overrides_are_typed_by_yaml_and_create_nested_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, {"name": "t", "datasets": DATA})

    cfg = load_config(
        path,
        [
            "sft.max_steps=12",  # int
            "dpo.dpo_beta=0.25",  # float
            "sft.learning_rate=1e-5",  # YAML 1.1 reads a string; the float field takes it as 1e-5
            "sft.lora.r=2",  # creates the nested mapping
            "evaluation.models=[sft, policy, base]",  # list
            "sft.max_prompt_len=null",  # None
            "tracking.experiment_name=exp-2",  # str
            "cache.enabled=false",  # bool
        ],
    )

    assert cfg.sft.max_steps == 12 and isinstance(cfg.sft.max_steps, int)
    assert cfg.dpo.dpo_beta == 0.25
    assert cfg.sft.learning_rate == pytest.approx(1e-5, rel=0, abs=1e-12)
    assert cfg.sft.lora == LoRAConfig(r=2)
    assert cfg.evaluation.models == ["sft", "policy", "base"]
    assert cfg.sft.max_prompt_len is None
    assert cfg.tracking.experiment_name == "exp-2"
    assert cfg.cache.enabled is False


def test_a_bad_override_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, {"name": "t", "datasets": DATA})

    with pytest.raises(ConfigError) as exc:
        load_config(path, ["sft.max_stepz=3"])
    assert "sft.max_stepz" in _errors(exc)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["sft.max_steps"])
    with pytest.raises(ConfigError, match="name: is a str, not a mapping"):
        apply_override({"name": "t"}, "name.x=1")


def test_stages_follow_the_algorithm_and_evaluation_needs() -> None:
    dpo = parse_config({"name": "t", "datasets": DATA, "algorithm": "dpo"})
    dpo_no_rm = parse_config({"name": "t", "datasets": DATA, "algorithm": "dpo", "evaluation": {"reward_model": False}})
    ppo = parse_config({"name": "t", "datasets": DATA, "algorithm": "ppo"})

    assert dpo.active_stages() == ["validate", "sft", "reward_model", "dpo", "evaluate"]
    assert dpo_no_rm.active_stages() == ["validate", "sft", "dpo", "evaluate"]
    assert ppo.active_stages() == ["validate", "sft", "reward_model", "ppo", "evaluate"]
    with pytest.raises(ConfigError, match="lack upstream stage"):
        parse_config({"name": "t", "datasets": DATA, "algorithm": "ppo", "stages": ["validate", "sft", "ppo"]})
    with pytest.raises(ConfigError, match="needs datasets.preferences"):
        parse_config({"name": "t", "datasets": {"demonstrations": {"path": "d"}, "prompts_eval": {"path": "e"}}})


def test_defaults_put_tracking_and_work_under_the_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"name": "t", "datasets": DATA})

    assert cfg.work_path() == tmp_path / "runs"
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert cfg.artifact_location() == (tmp_path / "runs" / "mlartifacts").as_uri()
    # One setting each points at real servers.
    served = parse_config({"name": "t", "datasets": DATA, "tracking": {"tracking_uri": "http://127.0.0.1:5000"}})
    assert served.tracking_uri() == "http://127.0.0.1:5000"


def test_config_hash_is_canonical() -> None:
    a = parse_config({"name": "t", "datasets": DATA, "sft": {"max_steps": 5}})
    b = parse_config({"sft": {"max_steps": 5}, "datasets": DATA, "name": "t", "seed": 0})
    c = parse_config({"name": "t", "datasets": DATA, "sft": {"max_steps": 6}})

    assert a.config_hash() == b.config_hash() != c.config_hash()


@pytest.mark.parametrize("name", ["quickstart", "smollm2-dpo", "smollm2-ppo", "reference"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")

    assert isinstance(cfg, PipelineConfig) and cfg.name


def test_reference_config_documents_every_key() -> None:
    """Every key of the reference config has a comment on its line or the line above."""
    lines = (REPO / "configs" / "reference.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped or stripped.startswith("- "):
            continue
        above = lines[i - 1].strip() if i else ""
        if "#" not in line and not above.startswith("#"):
            undocumented.append(stripped)
    assert undocumented == []


def test_reference_config_is_rendered_from_the_docstrings() -> None:
    """`configs/reference.yaml` is exactly what `python -m flows.config --reference` prints (no drift)."""
    from flows.config import render_reference_config

    shipped = (REPO / "configs" / "reference.yaml").read_text()
    assert shipped == render_reference_config(), (
        "a config docstring changed: python -m flows.config --reference > configs/reference.yaml"
    )


def test_ppo_runs_the_guides_recipe_only_when_the_config_has_a_collect_section(tmp_path: Path) -> None:
    # Without a `collect:` section PPO's reward model trains on datasets.preferences: no task's judge is a default.
    plain = load_config(_write(tmp_path, {"name": "t", "datasets": DATA, "algorithm": "ppo"}))
    assert "collect" not in plain.active_stages()
    # With one, the RM learns on rankings of the SFT model's own samples (docs/pitfalls.md §12).
    recipe = load_config(
        _write(tmp_path, {"name": "t", "datasets": DATA, "algorithm": "ppo", "seed": 4, "collect": {"judge": "gold"}})
    )
    assert recipe.active_stages() == ["validate", "sft", "collect", "reward_model", "ppo", "evaluate"]
    assert recipe.collect.seed == 4 and recipe.collect.sampling.max_new_tokens == "auto"
    # DPO keeps its path; PPO on reward functions alone needs no reward model at all.
    dpo = load_config(_write(tmp_path, {"name": "t", "datasets": DATA, "collect": {"judge": "gold"}}))
    assert "collect" not in dpo.active_stages()
    rules = load_config(
        _write(
            tmp_path,
            {
                "name": "t",
                "datasets": DATA,
                "algorithm": "ppo",
                "evaluation": {"reward_model": False},
                "ppo": {"reward_model_weight": 0, "reward_functions": {"m:f": 1.0}},
            },
        )
    )
    assert rules.active_stages() == ["validate", "sft", "ppo", "evaluate"]


def test_no_tasks_judge_is_a_default(tmp_path: Path) -> None:
    # A pipeline on the user's own data gets no gold scores and no collect judge unless the config names them.
    cfg = load_config(_write(tmp_path, {"name": "t", "datasets": DATA}))
    assert cfg.evaluation.gold_judge is None and cfg.collect.judge is None
    with pytest.raises(ConfigError, match="collect.judge"):
        load_config(
            _write(
                tmp_path,
                {
                    "name": "t",
                    "datasets": DATA,
                    "algorithm": "ppo",
                    "stages": ["validate", "sft", "collect", "reward_model", "ppo"],
                },
            )
        )
    with pytest.raises(ConfigError, match="module:function"):
        load_config(_write(tmp_path, {"name": "t", "datasets": DATA, "evaluation": {"gold_judge": "gold"}}))
    bundled = load_config("configs/quickstart.yaml")
    assert bundled.evaluation.gold_judge == "rlhf_core.support_bot:gold_score" and bundled.collect.judge == "gold"


def test_grpo_and_rloo_train_section_grpo_and_need_the_rm_only_when_it_is_weighted(tmp_path: Path) -> None:
    base = {"name": "t", "datasets": {**DATA, "prompts_train": {"path": "p"}, "prompts_eval": {"path": "e"}}}
    rloo = load_config(_write(tmp_path, {**base, "algorithm": "rloo"}))
    assert (
        rloo.grpo.algorithm == "rloo"
        and "rloo" in rloo.active_stages()
        and rloo.required_upstream() == ["reward_model", "sft", "validate"]
    )
    # Reward functions alone: no reward model needed by the policy (evaluation may still train one).
    functions = {
        "grpo": {"reward_model_weight": 0, "reward_functions": {"m:f": 1.0}},
        "evaluation": {"reward_model": False},
    }
    grpo = load_config(_write(tmp_path, {**base, "algorithm": "grpo", **functions}))
    assert grpo.active_stages() == ["validate", "sft", "grpo", "evaluate"] and grpo.grpo.algorithm == "grpo"
    with pytest.raises(ConfigError, match="grpo.algorithm is 'grpo' but algorithm is 'rloo'"):
        load_config(_write(tmp_path, {**base, "algorithm": "rloo", "grpo": {"algorithm": "grpo"}}))
    with pytest.raises(ConfigError, match="stage 'dpo' listed but algorithm is 'grpo'"):
        load_config(_write(tmp_path, {**base, "algorithm": "grpo", "stages": ["validate", "sft", "dpo"]}))
