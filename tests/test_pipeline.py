"""The whole pipeline against a real Prefect server (its test harness) and a real MLflow SQLite store.

Given the tiny offline model and a small slice of the bundled support-bot data, with a few optimizer steps per
stage, when the pipeline runs:
- then every stage is one Prefect task run and one MLflow child run (params, step metrics, dataset inputs with our
  digests, the model), the policy is registered with aliases, and lineage from it reaches every dataset digest;
- when it runs again, nothing is trained (every stage reused, recorded as `rlhf.reused.<stage>`);
- when only the DPO beta changes, only DPO and evaluation run again;
- a stage runs alone as its own flow, given its upstream pointers;
- when a stage's MLflow run is deleted, that stage (only) reruns;
- when a real pipeline process is SIGKILLed during PPO, the next run resumes PPO from its checkpoint;
- when the data is invalid, the flow fails before any training with the report attached;
- when two pipelines need the same stage at once, it is trained once.

The tests share one work dir and run in file order (each builds on the previous store).
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml
from helpers.browser import headless_chromium, mlflow_ui, open_mlflow_runs_table
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from flows.config import load_config
from flows.lineage import walk_lineage
from flows.pipeline import PipelineResult, rlhf_pipeline, start_pipeline_run
from flows.stages import dpo_flow
from tasks.runner import StageOutcome, StageRun, run_stage

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "support_bot"
STAGES = ["validate", "sft", "reward_model", "dpo", "evaluate"]
TINY = {"batch_size": 4, "progress_bar": False, "max_prompt_len": 48, "max_response_len": 32}


@dataclass
class Project:
    root: Path
    config: Path
    client: MlflowClient

    def stage_runs(self, stage: str | None = None) -> list:
        query = "tags.rlhf.kind = 'stage'" + (f" and tags.rlhf.stage = '{stage}'" if stage else "")
        return self.client.search_runs(
            self.client.get_experiment_by_name("rlhf-test").experiment_id, query, max_results=1000
        )


def pipeline_config(root: Path) -> dict:
    """The test pipeline's config (tiny: seconds per stage), working under `root/runs`."""
    return {
        "name": "test-pipeline",
        "base_model": "tiny",
        "algorithm": "dpo",
        "seed": 0,
        "work_dir": str(root / "runs"),
        "datasets": {
            "demonstrations": {"path": str(DATA / "demonstrations.jsonl"), "limit": 24},
            "preferences": {"path": str(DATA / "preferences.jsonl"), "limit": 24},
            "prompts_train": {"path": str(DATA / "prompts_train.jsonl"), "limit": 8},
            "prompts_eval": {"path": str(DATA / "prompts_eval.jsonl"), "limit": 4},
            "eval_fraction": 0.25,
        },
        "sft": {**TINY, "max_steps": 3, "checkpoint_every": 3},
        "reward_model": {**TINY, "max_steps": 3},
        "dpo": {**TINY, "max_steps": 2},
        "ppo": {
            "batch_size": 4,
            "rollout_batch_size": 4,
            "ppo_epochs": 1,
            "max_new_tokens": 8,
            "max_steps": 12,
            "checkpoint_every": 1,
            "progress_bar": False,
            "max_prompt_len": 48,
            "weak_reward_model": "warn",
            # 8 new tokens end no reply of this task: the rollouts carry no signal, which is fine for a test of
            # orchestration (the guard itself: tests/test_learning_direction.py).
            "dead_signal": "warn",
        },
        "evaluation": {
            "sampling": {"max_new_tokens": 8},
            "num_prompts": 4,
            "batch_size": 4,
            "gold_judge": "rlhf_core.support_bot:gold_score",
        },
        # Short sequences on purpose (seconds per stage): the truncation guard would stop them.
        "lengths": {"allow_truncation": True},
        "tracking": {"experiment_name": "rlhf-test"},
        # Pinned: other people's edits of the working tree during the test must not invalidate the cache. The
        # default (package version + source hash) is covered by tests/test_caching.py.
        "cache": {"code_version": "test"},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Project:
    root = tmp_path_factory.mktemp("pipeline")
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(root)))
    tracking_uri = load_config(path).tracking_uri()
    return Project(root, path, MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))


@pytest.fixture(scope="module")
def first(project: Project) -> PipelineResult:
    return rlhf_pipeline(str(project.config))


def _task_runs(flow_run_id: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _task_run_names(flow_run_id: str) -> list[str]:
    return sorted(r.name.rsplit("-", 1)[0] for r in _task_runs(flow_run_id))


def _task_run_states(flow_run_id: str) -> dict[str, str]:
    """Stage → the name of its task run's final state, as Prefect's UI shows it."""
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in _task_runs(flow_run_id)}


def _flow_artifacts(flow_run_id: str) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def test_the_dag_runs_one_task_and_one_child_run_per_stage(project: Project, first: PipelineResult) -> None:
    # Then: one Prefect task run per stage, all executed now.
    assert _task_run_names(first.flow_run_id) == sorted(STAGES)
    assert first.executed() == STAGES
    assert _task_run_states(first.flow_run_id) == dict.fromkeys(STAGES, "Completed")

    # One MLflow parent run tagged with the flow run, one child run per stage under it.
    parent = project.client.get_run(first.parent_run_id)
    assert parent.data.tags["rlhf.kind"] == "pipeline"
    assert parent.data.tags["prefect.flow_run_id"] == first.flow_run_id
    assert parent.info.status == "FINISHED"
    assert [a.path for a in project.client.list_artifacts(first.parent_run_id)] == ["pipeline_config.yaml"]
    # The runs table tells pipelines apart: named by algorithm and UTC start, key settings and the policy's
    # evaluation on the parent run, in an experiment MLflow's UI opens on its runs table.
    assert re.fullmatch(r"test-pipeline-dpo-\d{8}-\d{6}", parent.info.run_name)
    assert parent.data.params["dpo.dpo_beta"] == "0.1" and parent.data.params["dpo.max_steps"] == "2"
    assert parent.data.metrics == first.stages["evaluate"].metrics
    assert {"eval/gold_score", "eval/win_rate_gold", "eval/rm_score", "eval/kl_to_ref"} <= parent.data.metrics.keys()
    experiment = project.client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    children = {r.data.tags["rlhf.stage"]: r for r in project.stage_runs()}
    assert sorted(children) == sorted(STAGES)
    for stage, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == first.parent_run_id
        assert parent.data.tags[f"rlhf.stage_run.{stage}"] == run.info.run_id
        assert run.data.tags["rlhf.cache_key"] == first.stages[stage].cache_key

    # Each training stage: its config as params, step metrics, its datasets with our digests, the model.
    digests = first.stages["validate"].data
    for stage, data in (("sft", "sft_train"), ("reward_model", "preference_train"), ("dpo", "preference_train")):
        run = children[stage]
        assert run.data.params[f"{stage}.max_steps"] == str(
            load_config(project.config).model_dump()[stage]["max_steps"]
        )
        assert run.data.tags[f"rlhf.data.{data}.digest"] == digests[data]
        inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert inputs[data] == digests[data].rpartition(":")[2][:32]
        assert {"model", "plots"} <= {a.path for a in project.client.list_artifacts(run.info.run_id)}
    sft_loss = project.client.get_metric_history(children["sft"].info.run_id, "sft/loss")
    assert [m.step for m in sft_loss] == [1, 2, 3]
    assert children["dpo"].data.tags["rlhf.upstream.sft.run_id"] == children["sft"].info.run_id

    # Evaluation: the table, and one nested run per model with the same metric names.
    evaluate = children["evaluate"]
    assert "eval_samples.json" in {a.path for a in project.client.list_artifacts(evaluate.info.run_id)}
    per_model = project.client.search_runs(
        evaluate.info.experiment_id, f"tags.mlflow.parentRunId = '{evaluate.info.run_id}'"
    )
    assert sorted(r.data.tags["rlhf.eval.model"] for r in per_model) == ["policy", "sft"]
    assert per_model[0].data.metrics.keys() == per_model[1].data.metrics.keys()
    assert {"eval/rm_score", "eval/gold_score", "eval/kl_to_ref"} <= per_model[0].data.metrics.keys()

    # The policy is registered; the first one is both candidate and champion.
    version = project.client.get_model_version_by_alias("rlhf-policy", "candidate")
    assert version.run_id == children["dpo"].info.run_id
    assert sorted(version.aliases) == ["candidate", "champion"]

    # The logged models load with from_pretrained from the downloaded artifacts.
    policy_dir = mlflow.artifacts.download_artifacts("models:/rlhf-policy@candidate", tracking_uri=first.tracking_uri)
    assert AutoModelForCausalLM.from_pretrained(policy_dir).config.model_type == "llama"
    rm_dir = mlflow.artifacts.download_artifacts(
        first.stages["reward_model"].model_uri, tracking_uri=first.tracking_uri
    )
    assert AutoModelForSequenceClassification.from_pretrained(rm_dir).config.num_labels == 1

    # Prefect artifacts of the flow run: the MLflow link and the stage-pointer table.
    artifacts = _flow_artifacts(first.flow_run_id)
    assert {"mlflow-run", "stage-pointers"} <= artifacts.keys()
    assert first.parent_run_id in artifacts["mlflow-run"].data


def test_lineage_from_the_registered_model_reaches_every_dataset_digest(
    project: Project, first: PipelineResult
) -> None:
    tree = walk_lineage("models:/rlhf-policy@candidate", project.client)

    assert tree.problems() == []
    found = tree.digests()
    for name, digest in first.stages["validate"].data.items():
        assert found[f"validate/{name}"] == digest
    assert found["sft/sft_train"] == first.stages["validate"].data["sft_train"]
    base = [n for n in tree.walk() if n.kind == "base_model"]
    assert base and base[0].model_uri.endswith("tiny-seed0")


def test_a_rerun_is_fully_cached(project: Project, first: PipelineResult, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {r.info.run_id for r in project.stage_runs()}
    # An MLflow server shows this local store elsewhere than `rlhf ui`'s port (as under scripts/serve_local.sh).
    served = "http://127.0.0.1:5999"
    monkeypatch.setenv("RLHF_MLFLOW_UI_URL", served)

    again = rlhf_pipeline(str(project.config))

    # Then nothing executed: no new stage runs, no new model version; the parent records what it reused.
    assert again.executed() == []
    # Prefect shows every stage as a cache hit, not as one more Completed run.
    assert _task_run_states(again.flow_run_id) == dict.fromkeys(STAGES, "Cached")
    # The flow run's link (and the printed one) open that server's page of the parent run.
    page = f"{served}/#/experiments/{again.experiment_id}/runs/{again.parent_run_id}"
    assert again.mlflow_run_url == page
    assert _flow_artifacts(again.flow_run_id)["mlflow-run"].data.endswith(f"]({page})")
    assert {r.info.run_id for r in project.stage_runs()} == before
    tags = project.client.get_run(again.parent_run_id).data.tags
    for stage in STAGES:
        assert tags[f"rlhf.reused.{stage}"] == first.stages[stage].run_id
    assert again.registered.version == first.registered.version
    assert _task_run_names(again.flow_run_id) == sorted(STAGES)


def test_changing_the_dpo_beta_reruns_only_dpo_and_evaluation(project: Project, first: PipelineResult) -> None:
    result = rlhf_pipeline(str(project.config), ["dpo.dpo_beta=0.2"])

    assert result.executed() == ["dpo", "evaluate"]
    for stage in ("validate", "sft", "reward_model"):
        assert result.stages[stage].run_id == first.stages[stage].run_id
    assert _task_run_states(result.flow_run_id) == {
        "validate": "Cached",
        "sft": "Cached",
        "reward_model": "Cached",
        "dpo": "Completed",
        "evaluate": "Completed",
    }
    dpo = project.client.get_run(result.stages["dpo"].run_id)
    assert dpo.data.params["dpo.dpo_beta"] == "0.2"
    assert project.client.get_model_version_by_alias("rlhf-policy", "candidate").run_id == dpo.info.run_id
    # The first pipeline's policy, @champion, was evaluated beside the new one on the same prompts, and promotion
    # compared those two numbers.
    per_model = result.stages["evaluate"].extra["per_model"]
    assert set(per_model) == {"sft", "policy", "champion"}
    evaluate = project.client.get_run(result.stages["evaluate"].run_id)
    assert evaluate.data.tags["rlhf.upstream.champion.run_id"] == first.stages["dpo"].run_id
    assert result.registered.champion_value == per_model["champion"][result.registered.metric]


def test_a_stage_runs_alone_as_its_own_flow_given_upstream_pointers(project: Project, first: PipelineResult) -> None:
    pointer = dpo_flow(str(project.config), {"sft": first.stages["sft"].model_dump()}, ["dpo.dpo_beta=0.3"])

    assert not pointer.reused and pointer.model_uri == f"runs:/{pointer.run_id}/model"
    run = project.client.get_run(pointer.run_id)
    assert run.data.tags["rlhf.upstream.sft.run_id"] == first.stages["sft"].run_id
    parent = project.client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["rlhf.flow"] == "stage:dpo"
    assert parent.data.tags["rlhf.reused.validate"] == first.stages["validate"].run_id


def test_a_stage_whose_mlflow_run_was_deleted_reruns(project: Project, first: PipelineResult) -> None:
    project.client.delete_run(first.stages["reward_model"].run_id)

    result = rlhf_pipeline(str(project.config))

    # Only the RM reruns: downstream keys depend on its cache key, which is unchanged.
    assert result.executed() == ["reward_model"]
    assert result.stages["reward_model"].run_id != first.stages["reward_model"].run_id
    assert result.stages["dpo"].run_id == first.stages["dpo"].run_id


def test_a_pipeline_killed_during_ppo_resumes_ppo_from_its_checkpoint(project: Project, prefect_api: str) -> None:
    # Given a real pipeline process running PPO, SIGKILLed once PPO has written a checkpoint.
    overrides = ["algorithm=ppo"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", str(project.config), *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pattern = str(project.root / "runs" / "stages" / "ppo-*" / "train" / "checkpoints" / "step-*")
    deadline = time.monotonic() + 240
    while not glob.glob(pattern):
        assert proc.poll() is None, "the pipeline ended before PPO wrote a checkpoint"
        assert time.monotonic() < deadline, "no PPO checkpoint appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = [r for r in project.stage_runs("ppo") if r.info.status == "RUNNING"]
    assert len(killed) == 1

    # When the pipeline runs again.
    result = rlhf_pipeline(str(project.config), overrides)

    # Then PPO resumed from the checkpoint and finished; upstream stages were reused.
    assert result.executed() == ["ppo", "evaluate"]
    ppo = result.stages["ppo"]
    assert ppo.resumed_from_step is not None and ppo.resumed_from_step > 0
    run = project.client.get_run(ppo.run_id)
    assert int(run.data.tags["rlhf.resumed_from_step"]) == ppo.resumed_from_step
    assert run.data.tags["rlhf.resumes_run"] == killed[0].info.run_id
    assert project.client.get_run(killed[0].info.run_id).info.status == "KILLED"
    steps = [m.step for m in project.client.get_metric_history(ppo.run_id, "ppo/kl")]
    assert steps and min(steps) > ppo.resumed_from_step and max(steps) == 12


WIN_RATE = "eval/win_rate_gold"
# Per run id (ag-grid's row id): the run-name link and the win-rate cell, as the page shows them.
READ_RUNS_TABLE = """
const shown = {};
for (const row of document.querySelectorAll('[role=row][row-id]')) {
  const run = shown[row.getAttribute('row-id')] ??= {};
  const link = row.querySelector('a[href*="/runs/"]');
  if (link) run.name = link.innerText.trim();
  const cell = row.querySelector(`[col-id="${arguments[0]}"]`);
  if (cell) run.value = cell.innerText.trim();
}
return shown;
"""


def test_the_mlflow_ui_lists_the_pipeline_runs_with_their_win_rates(project: Project, tmp_path: Path) -> None:
    # Given the pipelines run above, DPO and PPO: each parent run is named <pipeline>-<algorithm>-<UTC start> and
    # carries its policy's gold win rate (read from the store, not from the page).
    config = load_config(project.config)
    experiment_id = project.client.get_experiment_by_name("rlhf-test").experiment_id
    pipelines = project.client.search_runs(experiment_id, "tags.rlhf.kind = 'pipeline'", max_results=100)
    evaluated = {
        r.info.run_id: (r.info.run_name, r.data.metrics[WIN_RATE]) for r in pipelines if WIN_RATE in r.data.metrics
    }
    named = [re.fullmatch(r"test-pipeline-(dpo|ppo)-\d{8}-\d{6}", name) for name, _ in evaluated.values()]
    assert all(named) and {m[1] for m in named} == {"dpo", "ppo"}, evaluated

    # When a person opens the experiment's runs table in the MLflow UI (a real `rlhf ui` process, headless
    # Chromium), filtered to pipeline runs, with the win rate picked as a column.
    with (
        mlflow_ui(config.tracking_uri(), config.artifact_location(), tmp_path / "ui.log") as url,
        headless_chromium(tmp_path / "profile", window_size="1800,1000") as driver,
    ):
        open_mlflow_runs_table(driver, url, experiment_id, "tags.rlhf.kind = 'pipeline'", [f"metrics.`{WIN_RATE}`"])

        def complete() -> bool:  # React renders the rows after the page has loaded
            shown = driver.execute_script(READ_RUNS_TABLE, f"metrics.`{WIN_RATE}`")
            return all(shown.get(run, {}).get("value") not in (None, "", "-") for run in evaluated)

        deadline = time.monotonic() + 90
        while not complete() and time.monotonic() < deadline:
            time.sleep(0.5)
        shown = driver.execute_script(READ_RUNS_TABLE, f"metrics.`{WIN_RATE}`")

    # Then every evaluated pipeline run is a row under its name, showing its win rate.
    for run_id, (name, win_rate) in evaluated.items():
        assert run_id in shown, f"run {name} not in the runs table: {shown}"
        assert shown[run_id].get("name") == name
        value = shown[run_id].get("value")
        assert value not in (None, "", "-"), f"no {WIN_RATE} shown for run {name}: {shown[run_id]}"
        assert float(value) == pytest.approx(win_rate, rel=1e-6)


def test_invalid_data_stops_the_flow_before_any_training(project: Project) -> None:
    # Given demonstrations with an empty response.
    bad = project.root / "bad_demonstrations.jsonl"
    bad.write_text('{"prompt": "Where is my order?"}\n{"prompt": "Hello", "response": ""}\n')
    stage_dirs = set(os.listdir(project.root / "runs" / "stages"))
    runs_before = {r.info.run_id for r in project.stage_runs()}

    state = rlhf_pipeline(str(project.config), [f"datasets.demonstrations.path={bad}"], return_state=True)

    # Then the flow failed in validation: no stage directory and no stage run besides the failed validate run.
    assert state.is_failed()
    assert set(os.listdir(project.root / "runs" / "stages")) == stage_dirs
    new = [r for r in project.stage_runs() if r.info.run_id not in runs_before]
    assert [(r.data.tags["rlhf.stage"], r.info.status) for r in new] == [("validate", "FAILED")]
    report = mlflow.artifacts.load_text(f"runs:/{new[0].info.run_id}/validation_report.md")
    assert "datasets.demonstrations" in report
    artifacts = _flow_artifacts(state.state_details.flow_run_id)
    assert "datasets.demonstrations" in artifacts["validation-report"].data
    assert list((project.root / "runs" / "reports").glob("validation-*.md"))


def test_two_pipelines_needing_the_same_stage_train_it_once(project: Project) -> None:
    """Two threads (each with its own parent run, as two pipelines) enter the same stage at once: the lock lets
    one execute; the other waits and reuses its result."""
    config = load_config(project.config)
    calls: list[int] = []

    def execute(run: StageRun) -> StageOutcome:
        calls.append(1)
        time.sleep(0.5)  # the second pipeline arrives while this one is "training"
        return StageOutcome(metrics={"toy/value": 1.0})

    results = {}

    def pipeline(i: int) -> None:
        env = start_pipeline_run(config, flow_name=f"concurrent-{i}")
        results[i] = run_stage(env, "toy", stage_config={"x": 1}, data={}, upstream={}, execute=execute)

    threads = [threading.Thread(target=pipeline, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(calls) == 1
    assert results[0].run_id == results[1].run_id
    assert sorted(r.reused for r in results.values()) == [False, True]


def test_collect_feeds_the_reward_model_with_lineage(project: Project) -> None:
    """Given `collect` in the stages with the gold judge, when the pipeline runs, then the SFT model's responses
    are ranked, the RM trains on exactly those rankings, and lineage runs RM → collect → SFT and prompts."""
    overrides = [
        "stages=[validate, sft, collect, reward_model]",
        "collect.judge=gold",
        "collect.num_responses=3",
        "collect.num_prompts=8",
        "collect.sampling.max_new_tokens=8",
        "collect.eval_fraction=0.25",
    ]

    result = rlhf_pipeline(str(project.config), overrides)

    assert result.executed() == ["collect", "reward_model"]
    collect, rm = result.stages["collect"], result.stages["reward_model"]
    assert collect.metrics["collect/items"] == 8
    assert set(collect.datasets) == {"preference_train", "preference_eval"}
    # The RM read the collected rankings (not datasets.preferences), by digest.
    assert rm.data == {name: ref.digest for name, ref in collect.datasets.items()}
    rm_tags = project.client.get_run(rm.run_id).data.tags
    assert rm_tags["rlhf.upstream.collect.run_id"] == collect.run_id
    collect_tags = project.client.get_run(collect.run_id).data.tags
    assert collect_tags["rlhf.upstream.policy.run_id"] == result.stages["sft"].run_id
    assert collect_tags["rlhf.data.prompts_train.digest"] == result.stages["validate"].data["prompts_train"]
    # Each collected row is a ranking of 3 distinct responses of a training prompt.
    rows = [json.loads(line) for line in Path(collect.datasets["preference_train"].path).read_text().splitlines()]
    prompts = {json.loads(line)["prompt"] for line in (DATA / "prompts_train.jsonl").read_text().splitlines()}
    assert rows and all(r["prompt"] in prompts and len(set(r["responses"])) == len(r["responses"]) >= 2 for r in rows)
    node = walk_lineage(rm.run_id, project.client)
    assert {c.role: c.run_id for c in node.children}["collect"] == collect.run_id
