"""The declarative pipeline config: one YAML file → one validated `PipelineConfig`.

It lives here, below `tasks/` and `flows/`, because both read it (tasks never import flows); `flows/config.py`
re-exports it for the CLI.

    cfg = load_config("configs/quickstart.yaml", overrides=["dpo.dpo_beta=0.2", "sft.max_steps=10"])

Stage hyper-parameters ARE the `rlhf_core` config dataclasses (`SFTConfig`, `RewardConfig`, `DPOConfig`,
`PPOConfig`, `SamplingConfig`): pydantic validates a YAML mapping by constructing the dataclass, so the defaults
live in one place (the dataclass) and the dataclass's own `__post_init__` checks apply. Every model forbids
unknown keys; a `ConfigError` names each bad key by its dotted path (`sft.max_stepz: unexpected key`).

Relative paths (`work_dir`, dataset paths, a local `base_model`) are relative to the current working directory,
which is the repository root for the CLI and the Prefect deployments. `configs/reference.yaml` documents every key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_core.collection import CollectConfig
from rlhf_core.generation import SamplingConfig
from rlhf_core.lengths import LengthPolicy
from rlhf_core.trainers.dpo import DPOConfig
from rlhf_core.trainers.grpo import GRPOConfig
from rlhf_core.trainers.ppo import PPOConfig
from rlhf_core.trainers.reward import RewardConfig
from rlhf_core.trainers.sft import SFTConfig

Stage = Literal["validate", "sft", "collect", "reward_model", "ppo", "grpo", "rloo", "dpo", "evaluate"]
STAGE_ORDER: tuple[str, ...] = ("validate", "sft", "collect", "reward_model", "ppo", "grpo", "rloo", "dpo", "evaluate")
TRAINER_SECTIONS: tuple[str, ...] = ("sft", "reward_model", "ppo", "grpo", "dpo")
POLICY_STAGES: tuple[str, ...] = ("ppo", "grpo", "rloo", "dpo")
CRITIC_FREE: tuple[str, ...] = ("grpo", "rloo")
"""The algorithms of `rlhf_core.trainers.grpo`: one config section (`grpo:`), the stage named by the algorithm."""
SEEDED_SECTIONS: tuple[str, ...] = (*TRAINER_SECTIONS, "collect")
TINY_BASE = "tiny"
# The length limits the pipeline sets to `auto` unless the config names them (section path → field names).
AUTO_LENGTHS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("sft",): ("max_prompt_len", "max_response_len"),
    ("reward_model",): ("max_prompt_len", "max_response_len"),
    ("dpo",): ("max_prompt_len", "max_response_len"),
    ("ppo",): ("max_prompt_len", "max_new_tokens"),
    ("grpo",): ("max_prompt_len", "max_new_tokens"),
    ("collect",): ("max_prompt_len",),
    ("collect", "sampling"): ("max_new_tokens",),
    ("evaluation",): ("max_prompt_len",),
    ("evaluation", "sampling"): ("max_new_tokens",),
}
# Read once, at import: `mlflow.set_tracking_uri` writes this variable too, so a later read would see the store of
# whichever pipeline ran last in this process rather than the user's choice.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


class ConfigError(ValueError):
    """The pipeline config is invalid; `errors` lists `(dotted key path, message)`."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        if len(errors) == 1:  # one problem, one line
            path, message = errors[0]
            super().__init__(f"invalid pipeline config {source}: {path + ': ' if path else ''}{message}")
            return
        lines = "\n".join(f"  {path or '<root>'}: {message}" for path, message in errors)
        super().__init__(f"invalid pipeline config {source}:\n{lines}")


class _Strict(BaseModel):
    # Attribute docstrings become field descriptions: `configs/reference.yaml` is rendered from them.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DatasetSource(_Strict):
    """One dataset: a local file/directory (jsonl, json, parquet, csv, a `datasets.save_to_disk` dir) or a hub
    name, plus format hints for `schemas.load_rows`."""

    path: str
    """File, directory or hub dataset name."""
    format: str | None = None
    """Format hint passed to the loader (e.g. `trl`, `hh-rlhf`, `messages`); None: detect."""
    split: str | None = None
    """Split of a hub dataset or `DatasetDict` directory (None: the loader's default)."""
    limit: int | None = Field(default=None, gt=0)
    """Keep only the first N rows (after loading, before the split) — quick runs and tests."""


class PreferenceSource(DatasetSource):
    """Comparisons for the reward model and DPO: pairwise preferences or rankings (best first)."""

    kind: Literal["preference", "ranking"] = "preference"
    """`ranking` rows are expanded to pairs for DPO (`schemas.ranking_to_pairs`); the RM trains on them as is."""


class Datasets(_Strict):
    """What each stage reads. Held-out splits of demonstrations and preferences are carved out by `eval_fraction`."""

    demonstrations: DatasetSource | None = None
    """`{"prompt", "response"}` rows for SFT."""
    preferences: PreferenceSource | None = None
    """`{"prompt", "chosen", "rejected"}` (or ranking) rows for the reward model and DPO."""
    prompts_train: DatasetSource | None = None
    """`{"prompt"}` rows for PPO rollouts."""
    prompts_eval: DatasetSource | None = None
    """Held-out `{"prompt"}` rows for evaluation (and PPO's periodic eval)."""
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of demonstrations / preferences held out for the trainers' eval loss (seeded split)."""


class EvaluationSettings(_Strict):
    """How the final models are compared (see `rlhf_core.evaluation.evaluate_models`)."""

    sampling: SamplingConfig = SamplingConfig()
    """Sampling of the evaluated responses (max_new_tokens, temperature, top_p, top_k, do_sample, seed)."""
    num_prompts: int | None = Field(default=None, gt=0)
    """Evaluate on the first N held-out prompts (None: all)."""
    models: list[Literal["base", "sft", "policy"]] = ["sft", "policy"]
    """Which models are compared; `policy` is the PPO/DPO result, `base` the untrained base model."""
    baseline: Literal["base", "sft"] = "sft"
    """Win rates are measured against this model."""
    reward_model: bool = True
    """Score responses with the trained reward model (with DPO this makes the pipeline train the RM too)."""
    gold_judge: str | None = None
    """A judge no stage trains on, `module:function` scoring `(prompt, response_text) -> float` — the task's
    ground truth when it has one (the bundled task's: `rlhf_core.support_bot:gold_score`; imports and runs that
    code). None: no gold scores; promotion then compares RM scores."""

    @model_validator(mode="after")
    def _gold_judge_is_a_function_name(self) -> EvaluationSettings:
        if self.gold_judge is not None and ":" not in self.gold_judge:
            raise ValueError(
                f"gold_judge must be 'module:function' (e.g. rlhf_core.support_bot:gold_score), got {self.gold_judge!r}"
            )
        return self

    batch_size: int = Field(default=8, gt=0)
    """Prompts per generation / scoring batch."""
    max_prompt_len: int | Literal["auto"] | None = "auto"
    """Keep the last this-many prompt tokens (None: no limit; "auto": cover the eval prompts, see `lengths`)."""

    @model_validator(mode="after")
    def _positive_prompt_len(self) -> EvaluationSettings:
        if isinstance(self.max_prompt_len, int) and self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1, 'auto' or None, got {self.max_prompt_len}")
        return self


class TrackingSettings(_Strict):
    """MLflow. Defaults need no server: a SQLite store and an artifact folder under the work dir."""

    tracking_uri: str | None = None
    """None: `$MLFLOW_TRACKING_URI` if the process started with it set, else `sqlite:///<work_dir>/mlflow.db`.
    Or e.g. `http://127.0.0.1:5000` for a real `mlflow server`."""
    artifact_location: str | None = None
    """Where a NEW experiment stores artifacts (None: `<work_dir>/mlartifacts`; ignored for a server's default)."""
    experiment_name: str = "rlhf"
    """MLflow experiment of every run of this pipeline."""
    registered_model: str = "rlhf-policy"
    """Name the final policy is registered under (alias `candidate`, and `champion` when it wins)."""
    promotion_metric: str | None = None
    """The evaluation metric (higher is better) on which a new policy must beat the current `@champion`, both
    scored in the same evaluation on the same prompts (the champion is re-evaluated beside the candidate).
    None: `eval/gold_score` with a gold judge, else `eval/rm_score`."""
    system_metrics: bool = True
    """Log CPU/memory (and GPU, with pynvml) system metrics on stage runs, sampled every 10 s."""
    log_model: bool = True
    """Log each trained model as the run artifact `model/` (needed by `runs:/` URIs and registration)."""


class StagePrefectSettings(_Strict):
    """Prefect task options of one stage (unset: the pipeline-wide value)."""

    timeout_seconds: float | None = Field(default=None, gt=0)
    """Wall-clock limit of this stage's task."""
    retries: int | None = Field(default=None, ge=0)
    """Retries of this stage's task."""
    retry_delay_seconds: float | None = Field(default=None, ge=0)
    """Wait between this stage's retries."""


class PrefectSettings(_Strict):
    """Prefect task options. A retried training task resumes from the stage's last checkpoint."""

    timeout_seconds: float | None = Field(default=None, gt=0)
    """Per-task wall-clock limit (None: none)."""
    retries: int = Field(default=0, ge=0)
    """How often a failed stage task is retried."""
    retry_delay_seconds: float = Field(default=0.0, ge=0)
    """Wait between retries."""
    stages: dict[Stage, StagePrefectSettings] = {}
    """Per-stage overrides, e.g. `{ppo: {timeout_seconds: 7200, retries: 2}}`."""

    def for_stage(self, stage: str) -> dict[str, Any]:
        """`timeout_seconds`, `retries`, `retry_delay_seconds` for `stage`, per-stage values first."""
        own = self.stages.get(stage)  # type: ignore[call-overload]
        out = {
            "timeout_seconds": self.timeout_seconds,
            "retries": self.retries,
            "retry_delay_seconds": self.retry_delay_seconds,
        }
        if own is not None:
            out.update({k: v for k, v in own.model_dump().items() if v is not None})
        return out


LAUNCHABLE_STAGES: tuple[str, ...] = ("sft", "reward_model", "dpo")


class StageLaunchSettings(_Strict):
    """How one training stage's trainer is started (unset: the pipeline-wide value of `launch`)."""

    backend: Literal["accelerate", "ray"] | None = None
    """`accelerate`: `accelerate launch` on this machine (or the machines of `config_file`); `ray`: Ray Train
    workers on the Ray cluster at `ray_address`."""
    processes: int | None = Field(default=None, ge=1)
    """Data-parallel processes (ranks). `batch_size` stays per process: the global batch is
    `batch_size × grad_accum_steps × processes` (halve `batch_size` when doubling `processes` to keep the
    update). With `accelerate` and 1 the trainer runs inside the task's own process, as before."""
    config_file: str | None = None
    """An accelerate config file (FSDP, DeepSpeed, several machines), passed to `accelerate launch
    --config_file`; its content enters the cache key. `processes` still sets `--num_processes`."""
    ray_address: str | None = None
    """Address of the Ray cluster (`host:port` of `ray start --head`; None: `auto`, the cluster this machine
    belongs to). Not in the cache key: where a stage runs does not change what it computes."""
    gpus_per_process: float | None = Field(default=None, ge=0)
    """Ray: GPUs each worker asks for (0: CPU workers and the gloo backend; > 0: nccl). accelerate uses the
    GPUs it sees (`CUDA_VISIBLE_DEVICES`)."""


class LaunchSettings(StageLaunchSettings):
    """How the training stages (sft, reward_model, dpo) start their trainers: in the task's own process (the
    default), on N processes of this machine with `accelerate launch`, or on a Ray cluster (docs/deployment.md).
    Whatever the launch, the task alone writes the stage's MLflow run: rank 0 streams its metrics back."""

    backend: Literal["accelerate", "ray"] = "accelerate"
    """`accelerate`: `accelerate launch` on this machine (or the machines of `config_file`); `ray`: Ray Train
    workers on the Ray cluster at `ray_address`."""
    processes: int = Field(default=1, ge=1)
    """Data-parallel processes (ranks); `batch_size` stays per process (global batch = `batch_size ×
    grad_accum_steps × processes`). With `accelerate` and 1, the trainer runs inside the task's process."""
    gpus_per_process: float = Field(default=0.0, ge=0)
    """Ray: GPUs each worker asks for (0: CPU workers, gloo; > 0: nccl)."""
    stages: dict[Literal["sft", "reward_model", "dpo"], StageLaunchSettings] = {}
    """Per-stage overrides, e.g. `{sft: {processes: 4}, dpo: {backend: ray, processes: 8}}`."""

    def for_stage(self, stage: str) -> StageLaunchSettings:
        """The settings of `stage`, its own values first; the pipeline-wide ones apply to launchable stages
        only (other stages always run in the task's process)."""
        if stage not in LAUNCHABLE_STAGES:
            return StageLaunchSettings(backend="accelerate", processes=1)
        base = self.model_dump(exclude={"stages"})
        own = self.stages.get(stage)  # type: ignore[call-overload]
        if own is not None:
            base.update({k: v for k, v in own.model_dump().items() if v is not None})
        return StageLaunchSettings(**base)


class CacheSettings(_Strict):
    """Stage caching (see `tasks/caching.py`)."""

    enabled: bool = True
    """Reuse a finished stage whose cache key matches (False: retrain finished stages; an unfinished one still
    resumes from its checkpoints)."""
    code_version: str | None = None
    """Override the code version in every cache key (None: package version + hash of the library sources)."""


class PipelineConfig(_Strict):
    """A whole RLHF pipeline: base model, data, stages, hyper-parameters, tracking and orchestration."""

    name: str = Field(min_length=1)
    """Pipeline name: the `rlhf.pipeline` tag, and the start of the MLflow parent-run name
    (`<name>-<algorithm>-<UTC time>`)."""
    base_model: str = TINY_BASE
    """Local HF model directory, a hub name, or `tiny` (build the offline tiny Llama into the work dir)."""
    algorithm: Literal["ppo", "dpo", "grpo", "rloo"] = "dpo"
    """Policy optimisation after SFT: PPO (actor-critic, reward model), DPO (offline, preference pairs), or the
    critic-free GRPO / RLOO (K samples per prompt, section `grpo`)."""
    stages: list[Stage] | None = None
    """Stages to run, upstream stages included (None: every stage the algorithm and evaluation need)."""
    seed: int = 0
    """Pipeline seed: the default `seed` of every stage, the data split and the tiny base model."""
    work_dir: str = "runs"
    """Stage directories (checkpoints, models), canonical data, the default MLflow store."""
    datasets: Datasets = Datasets()
    """The data of every stage (validated before any training)."""
    lengths: LengthPolicy = LengthPolicy()
    """Token-length limits: every `max_prompt_len`, `max_response_len` and `max_new_tokens` of the stages
    defaults to `auto`, resolved from the token lengths the validate stage measures with the base model's
    tokenizer; an explicit limit that cuts more than 1 − `coverage` of the data stops the stage before training
    (`rlhf_core.lengths`, docs/pitfalls.md)."""
    sft: SFTConfig = SFTConfig()
    """SFT hyper-parameters: `rlhf_core.trainers.sft.SFTConfig`."""
    reward_model: RewardConfig = RewardConfig()
    """Reward-model hyper-parameters: `rlhf_core.trainers.reward.RewardConfig`."""
    dpo: DPOConfig = DPOConfig()
    """DPO hyper-parameters: `rlhf_core.trainers.dpo.DPOConfig`."""
    ppo: PPOConfig = PPOConfig()
    """PPO hyper-parameters: `rlhf_core.trainers.ppo.PPOConfig`."""
    grpo: GRPOConfig = GRPOConfig()
    """GRPO / RLOO hyper-parameters, for both critic-free algorithms (`rlhf_core.trainers.grpo.GRPOConfig`); its
    `algorithm` follows the pipeline's `algorithm`."""
    collect: CollectConfig = CollectConfig()
    """Preference collection (stage `collect`): sample K responses per training prompt, have a judge or people
    rank them; the reward model then trains on those rankings (`rlhf_core.collection.CollectConfig`,
    docs/collection.md). Runs when listed in `stages`, and by default with `algorithm: ppo` (or `grpo`/`rloo` with a
    reward model) when the config has a `collect:` section (the guide's recipe: the RM learns on the samples the
    policy will see)."""
    evaluation: EvaluationSettings = EvaluationSettings()
    """How the final models are compared."""
    tracking: TrackingSettings = TrackingSettings()
    """MLflow tracking and registry."""
    prefect: PrefectSettings = PrefectSettings()
    """Prefect task timeouts and retries."""
    launch: LaunchSettings = LaunchSettings()
    """Where the training stages run: in the task's process, on N processes (`accelerate launch`) or on a Ray
    cluster."""
    cache: CacheSettings = CacheSettings()
    """Stage caching."""

    @model_validator(mode="before")
    @classmethod
    def _stage_seeds_default_to_pipeline_seed(cls, data: Any) -> Any:
        """A stage section without its own `seed` gets the pipeline seed (the dataclass default otherwise)."""
        if isinstance(data, dict) and "seed" in data:
            data = dict(data)
            for section in SEEDED_SECTIONS:
                raw = data.get(section)
                if raw is None and section == "collect":
                    continue  # a present `collect:` section switches PPO's on-policy recipe on: keep it absent
                if raw is None:
                    data[section] = {"seed": data["seed"]}
                elif isinstance(raw, dict) and "seed" not in raw:
                    data[section] = {**raw, "seed": data["seed"]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _grpo_section_follows_the_algorithm(cls, data: Any) -> Any:
        """`algorithm: rloo` trains section `grpo` with the RLOO estimator; a conflicting `grpo.algorithm` is an
        error rather than a silent choice."""
        if not isinstance(data, dict) or data.get("algorithm") not in CRITIC_FREE:
            return data
        section = data.get("grpo")
        if section is None or isinstance(section, dict):
            section = dict(section or {})
            if section.get("algorithm", data["algorithm"]) != data["algorithm"]:
                raise ValueError(
                    f"grpo.algorithm is {section['algorithm']!r} but algorithm is "
                    f"{data['algorithm']!r}: set only the top-level algorithm"
                )
            data = {**data, "grpo": {**section, "algorithm": data["algorithm"]}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _lengths_default_to_auto(cls, data: Any) -> Any:
        """Every length limit the user did not set is `auto` (the library dataclasses keep integer defaults)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for path, names in AUTO_LENGTHS.items():
            if path[0] not in data and path[0] == "collect":
                continue  # keep an absent `collect:` absent (see `active_stages`); filled in after validation
            node = data
            for i, key in enumerate(path):
                child = node.get(key)
                if child is None:
                    child = {}
                elif not isinstance(child, dict):
                    break  # a non-mapping section is reported by validation
                node[key] = child = dict(child)
                node = child
                if i == len(path) - 1:
                    for name in names:
                        node.setdefault(name, "auto")
        return data

    @model_validator(mode="after")
    def _absent_collect_gets_pipeline_defaults(self) -> PipelineConfig:
        if "collect" not in self.model_fields_set:  # the defaults a written `collect: {}` would get
            collect = replace(
                self.collect,
                seed=self.seed,
                max_prompt_len="auto",
                sampling=replace(self.collect.sampling, max_new_tokens="auto"),
            )
            object.__setattr__(self, "collect", collect)  # a frozen model: set once, during validation
        return self

    @model_validator(mode="after")
    def _stages_are_consistent(self) -> PipelineConfig:
        missing = [s for s in self.required_upstream() if s not in self.active_stages()]
        if missing:
            raise ValueError(f"stages {self.stages} lack upstream stage(s) {missing}")
        others = [s for s in POLICY_STAGES if s != self.algorithm and s in (self.stages or [])]
        if others:
            raise ValueError(f"stage {others[0]!r} listed but algorithm is {self.algorithm!r}")
        needs = {
            "sft": "demonstrations",
            "collect": "prompts_train",
            "reward_model": "preferences",
            "dpo": "preferences",
            "ppo": "prompts_train",
            "grpo": "prompts_train",
            "rloo": "prompts_train",
            "evaluate": "prompts_eval",
        }
        if "collect" in self.active_stages():
            needs.pop("reward_model")  # it trains on the collected rankings
            if self.collect.labeler == "judge" and self.collect.judge is None:
                raise ValueError(
                    "collect.judge: the collect stage's judge labeler needs a judge: 'reward_model', "
                    "'module:function', or 'gold' (the bundled task's rlhf_core.support_bot:gold_score)"
                )
        for stage in self.active_stages():
            if stage in needs and getattr(self.datasets, needs[stage]) is None:
                raise ValueError(f"stage {stage!r} needs datasets.{needs[stage]}")
        return self

    # -- derived -----------------------------------------------------------------------------------------------

    def active_stages(self) -> list[str]:
        """The stages this pipeline runs, in DAG order."""
        if self.stages is not None:
            return [s for s in STAGE_ORDER if s in self.stages]
        wanted = {"validate", "sft", self.algorithm, "evaluate"}
        policy_rm = self.policy_uses_reward_model(self.algorithm)
        if policy_rm or self.evaluation.reward_model:
            wanted.add("reward_model")
        if policy_rm and "collect" in self.model_fields_set:
            # The guide's on-policy recipe: the RM learns on rankings of the SFT model's own samples, the
            # distribution PPO will sample from (docs/pitfalls.md). Only with a `collect:` section, which names
            # the judge: no task's judge is a default.
            wanted.add("collect")
        return [s for s in STAGE_ORDER if s in wanted]

    def required_upstream(self) -> list[str]:
        """Stages the active ones depend on (validate precedes all; PPO needs the RM; evaluate needs a model)."""
        active = set(self.active_stages())
        req: set[str] = set()
        if active - {"validate"}:
            req.add("validate")
        if active & {"collect", "reward_model", *POLICY_STAGES, "evaluate"}:
            req.add("sft")
        if any(self.policy_uses_reward_model(s) for s in active):
            req.add("reward_model")
        return sorted(req)

    def policy_uses_reward_model(self, stage: str) -> bool:
        """Whether the on-policy stage `stage` (ppo, grpo, rloo) scores with the reward model."""
        if stage == "ppo":
            return self.ppo.uses_reward_model
        return stage in CRITIC_FREE and self.grpo.uses_reward_model

    def work_path(self) -> Path:
        """`work_dir` as an absolute path."""
        return Path(self.work_dir).expanduser().resolve()

    def tracking_uri(self) -> str:
        """The MLflow tracking URI: the config's, else the user's `$MLFLOW_TRACKING_URI`, else SQLite under the
        work dir."""
        return self.tracking.tracking_uri or USER_TRACKING_URI or f"sqlite:///{self.work_path() / 'mlflow.db'}"

    def artifact_location(self) -> str:
        """Artifact root of a newly created experiment (default: `<work_dir>/mlartifacts`)."""
        return self.tracking.artifact_location or (self.work_path() / "mlartifacts").as_uri()

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the validated config (keys sorted, defaults filled in)."""
        return canonical_hash(self.model_dump(mode="json"))


def canonical_hash(obj: Any) -> str:
    """sha256 hex of `obj` as canonical JSON (sorted keys, no whitespace, non-JSON values as `str`)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Set one dotted key from `a.b.c=value`, the value parsed as YAML (`3` → int, `1e-5` → float, `[a, b]` →
    list, `null` → None, `tiny` → str). Intermediate mappings are created as needed. Returns `data` (mutated)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("overrides", [(key or override, f"override {override!r} is not of the form a.b=value")])
    # YAML 1.1 reads `1e-5` as a string; pydantic's lax mode turns it into the float a field asks for.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError("overrides", [(key, f"the value {raw!r} is not valid YAML ({_yaml_problem(exc)})")]) from None
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError("overrides", [(".".join(parts[: i + 1]), f"is a {type(child).__name__}, not a mapping")])
        node = child
    node[parts[-1]] = value
    return data


def parse_config(data: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    """Validate a raw mapping; raises `ConfigError` naming each bad key by its dotted path."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"])
            message = (
                "unexpected key" if err["type"] in ("extra_forbidden", "unexpected_keyword_argument") else err["msg"]
            )
            errors.append((path, message))
        raise ConfigError(source, errors) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML pipeline config, apply `a.b=value` overrides in order, validate."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path),
            [
                (
                    "",
                    f"not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset "
                    f"{exc.start}): is it the YAML config?",
                )
            ],
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("", f"not valid YAML: {_yaml_problem(exc)}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("", "the config file must hold a mapping")])
    for override in overrides or []:
        apply_override(data, override)
    return parse_config(data, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def dump_config(config: PipelineConfig) -> str:
    """The validated config (defaults filled in) as YAML — what the parent run logs as `pipeline_config.yaml`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
