"""The `launch` section and what a launched stage hands its ranks — fast checks, no process started.

- a stage's settings are its own `launch.stages.<stage>` values over the pipeline-wide ones; stages that cannot
  be launched (PPO, evaluation) always run in the task's process, and naming one under `launch.stages` is an error;
- the launch enters a stage's cache key exactly when it runs out of process, and everything in it but the Ray
  address changes the key;
- each trainer config survives the trip through the ranks' JSON spec unchanged (LoRA included);
- the launcher is `accelerate launch` with N processes on one machine, or the Ray driver with the cluster's address.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from rlhf_core.launch_worker import LaunchSpec, config_from_dict, trainers
from rlhf_core.trainers.config import LoRAConfig
from schemas.config import ConfigError, parse_config
from tasks.caching import cache_key
from tasks.launch import LaunchError, in_process, launch_key, launcher_command, stage_key_config


def config(launch: dict) -> dict:
    return {"name": "t", "stages": ["validate"], "launch": launch}  # no stage that needs data


def test_a_stage_override_wins_over_the_pipeline_wide_launch() -> None:
    launch = parse_config(config({"processes": 4, "stages": {"dpo": {"processes": 2, "backend": "ray"}}})).launch
    assert launch.for_stage("sft").processes == 4 and launch.for_stage("sft").backend == "accelerate"
    assert launch.for_stage("dpo").processes == 2 and launch.for_stage("dpo").backend == "ray"
    assert in_process(launch.for_stage("ppo")) and in_process(launch.for_stage("evaluate"))
    assert not in_process(launch.for_stage("reward_model"))


def test_ppo_cannot_be_named_under_launch_stages() -> None:
    with pytest.raises(ConfigError, match=r"launch\.stages\.ppo"):
        parse_config(config({"stages": {"ppo": {"processes": 2}}}))


def test_the_launch_enters_the_cache_key_only_out_of_process(tmp_path: Path) -> None:
    sft = parse_config(config({})).sft
    settings = {
        name: parse_config(config(launch)).launch.for_stage("sft")
        for name, launch in {
            "default": {},
            "two": {"processes": 2},
            "four": {"processes": 4},
            "ray": {"backend": "ray", "processes": 2},
            "ray_elsewhere": {"backend": "ray", "processes": 2, "ray_address": "10.0.0.1:6379"},
        }.items()
    }

    def key(name: str) -> str:
        return cache_key("sft", stage_key_config(sft, settings[name]), {}, {}, "v")

    assert launch_key(settings["default"]) is None
    assert key("default") == cache_key("sft", sft, {}, {}, "v")  # existing single-process keys stay valid
    assert len({key("default"), key("two"), key("four"), key("ray")}) == 4
    assert key("ray") == key("ray_elsewhere")  # where the cluster is does not change what it computes
    accelerate_config = tmp_path / "fsdp.yaml"
    accelerate_config.write_text("distributed_type: FSDP\n")
    with_file = parse_config(config({"processes": 2, "config_file": str(accelerate_config)})).launch.for_stage("sft")
    before = launch_key(with_file)
    accelerate_config.write_text("distributed_type: DEEPSPEED\n")
    assert before != launch_key(with_file) != launch_key(settings["two"])
    accelerate_config.unlink()
    with pytest.raises(LaunchError, match=r"launch\.config_file .*fsdp\.yaml: no such file"):
        launch_key(with_file)


@pytest.mark.parametrize("stage", ["sft", "reward_model", "dpo"])
def test_a_trainer_config_survives_the_json_spec(stage: str, tmp_path: Path) -> None:
    config_cls, _ = trainers()[stage]
    original = config_cls(
        max_steps=7, batch_size=3, lora=LoRAConfig(r=4, target_modules=("q_proj", "v_proj")), max_prompt_len=32
    )
    spec = LaunchSpec(stage, asdict(original), "m", "t.jsonl", "e.jsonl", "out", str(tmp_path))
    read = LaunchSpec.read(spec.write())
    assert config_from_dict(config_cls, json.loads(json.dumps(read.config))) == original


def test_the_launchers(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    accelerate = launcher_command(parse_config(config({"processes": 3})).launch.for_stage("sft"), spec)
    assert accelerate[1:3] == ["-m", "accelerate.commands.launch"]
    assert accelerate[accelerate.index("--num_processes") + 1] == "3" and "--multi_gpu" in accelerate
    assert accelerate[-3:] == ["-m", "rlhf_core.launch_worker", str(spec)]
    ray = launcher_command(
        parse_config(config({"backend": "ray", "processes": 2, "ray_address": "h:1"})).launch.for_stage("dpo"), spec
    )
    assert ray[1:4] == ["-m", "tasks.ray_driver", str(spec)]
    assert ray[ray.index("--address") + 1] == "h:1" and ray[ray.index("--processes") + 1] == "2"
