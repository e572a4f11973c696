"""Lineage walk against a real MLflow SQLite store whose runs carry the tags of `docs/lineage.md`.

Given a pipeline parent run with validate → sft → dpo child runs and `rlhf-policy@candidate` registered from the
DPO run, when we walk back from the registered model, then every stage, config, dataset digest and the base model
are found; a pointer to a run that does not exist is reported, not raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import DatasetInput, InputTag

from flows.lineage import LineageError, walk_lineage

DIGESTS = {
    "sft_train": "sha256:" + "a1" * 32,
    "preference_train": "sha256:" + "b2" * 32,
    "prompts": "sha256:" + "c3" * 32,
}
BASE_MODEL = "/models/tiny-base"
NEVER_WRITTEN = "f" * 32
# MLflow cannot tell which of its local sources a relative dataset path is; irrelevant to lineage.
pytestmark = pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")


@dataclass
class Store:
    uri: str
    client: MlflowClient
    parent: str
    validate: str
    sft: str
    dpo: str


def _stage_run(
    client: MlflowClient, exp: str, parent: str, stage: str, tags: dict[str, str], params: dict[str, str]
) -> str:
    run = client.create_run(
        exp,
        run_name=stage,
        tags={
            "rlhf.kind": "stage",
            "rlhf.stage": stage,
            "mlflow.parentRunId": parent,
            "rlhf.cache_key": f"key-{stage}",
            "rlhf.code_version": "0.1.0+test",
            **tags,
        },
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def build_store(root: Path) -> Store:
    """A real SQLite tracking + registry store holding one pipeline run, written the way `tasks/` writes it."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # The registry too, explicitly: otherwise it is the process-wide one (which a pipeline run may have set).
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("lineage-test", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(
        exp,
        run_name="pipeline",
        tags={
            "rlhf.kind": "pipeline",
            "rlhf.pipeline": "quickstart",
            "rlhf.config_hash": "cfg-hash-123",
            "prefect.flow_run_id": "flow-run-42",
        },
    ).info.run_id
    validate = _stage_run(
        client,
        exp,
        parent,
        "validate",
        {f"rlhf.data.{name}.digest": digest for name, digest in DIGESTS.items()},
        {"validate.kinds": "demonstration,preference,prompt"},
    )
    sft = _stage_run(
        client,
        exp,
        parent,
        "sft",
        {
            "rlhf.upstream.validate.run_id": validate,
            "rlhf.upstream.base.model_uri": BASE_MODEL,
            "rlhf.base_model": BASE_MODEL,
            "rlhf.data.sft_train.digest": DIGESTS["sft_train"],
        },
        {"sft.learning_rate": "0.0003", "sft.max_steps": "40"},
    )
    # The dataset input adds MLflow's own record (source, context) next to our digest tag.
    dataset = from_pandas(
        pd.DataFrame({"prompt": ["hi"], "response": ["hello"]}), source="data/sft.jsonl", name="sft_train"
    )
    client.log_inputs(
        sft, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])]
    )
    dpo = _stage_run(
        client,
        exp,
        parent,
        "dpo",
        {
            "rlhf.upstream.sft.run_id": sft,
            "rlhf.upstream.sft.model_uri": f"runs:/{sft}/model",
            "rlhf.upstream.reference.run_id": sft,
            "rlhf.upstream.reference.model_uri": f"runs:/{sft}/model",
            "rlhf.data.preference_train.digest": DIGESTS["preference_train"],
        },
        {"dpo.dpo_beta": "0.1", "dpo.learning_rate": "1e-05"},
    )
    client.create_registered_model("rlhf-policy")
    version = client.create_model_version("rlhf-policy", f"runs:/{dpo}/model", run_id=dpo)
    client.set_registered_model_alias("rlhf-policy", "candidate", version.version)
    return Store(uri, client, parent, validate, sft, dpo)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return build_store(tmp_path_factory.mktemp("lineage"))


def test_walk_from_registered_alias_reaches_every_digest_config_and_the_base_model(store: Store) -> None:
    # When we walk back from the alias the pipeline set.
    tree = walk_lineage("models:/rlhf-policy@candidate", store.client)

    # Then: the registered version, whose run is the DPO stage.
    assert tree.kind == "model_version"
    assert tree.registered["name"] == "rlhf-policy" and tree.registered["aliases"] == ["candidate"]
    (dpo,) = tree.children
    assert (dpo.kind, dpo.stage, dpo.run_id) == ("run", "dpo", store.dpo)
    assert dpo.params == {"dpo.dpo_beta": "0.1", "dpo.learning_rate": "1e-05"}
    assert (dpo.pipeline_run_id, dpo.pipeline_config_hash, dpo.flow_run_id) == (
        store.parent,
        "cfg-hash-123",
        "flow-run-42",
    )

    # The DPO run has two upstream roles, both the SFT run, each walked back to validation and the base model.
    assert [(c.role, c.run_id) for c in dpo.children] == [("reference", store.sft), ("sft", store.sft)]
    sft = dpo.children[1]
    assert sft.params == {"sft.learning_rate": "0.0003", "sft.max_steps": "40"}
    assert sft.model_uri == f"runs:/{store.sft}/model" and sft.base_model == BASE_MODEL
    (sft_data,) = sft.datasets
    assert (sft_data.name, sft_data.digest, sft_data.source, sft_data.context) == (
        "sft_train",
        DIGESTS["sft_train"],
        "data/sft.jsonl",
        "training",
    )
    base, validate = sft.children
    assert (base.kind, base.role, base.model_uri) == ("base_model", "base", BASE_MODEL)
    assert (validate.stage, validate.run_id, validate.children) == ("validate", store.validate, [])

    # Every dataset digest of the pipeline is in the tree, keyed by the stage that read it; nothing is missing.
    assert tree.digests() == {
        "dpo/preference_train": DIGESTS["preference_train"],
        "sft/sft_train": DIGESTS["sft_train"],
        **{f"validate/{name}": digest for name, digest in DIGESTS.items()},
    }
    assert tree.problems() == []
    assert {n.cache_key for n in tree.walk() if n.kind == "run"} == {"key-dpo", "key-sft", "key-validate"}


def test_every_uri_form_starts_the_same_walk(store: Store) -> None:
    by_alias = walk_lineage("models:/rlhf-policy@candidate", store.client)
    by_version = walk_lineage("models:/rlhf-policy/1", store.client)
    by_latest = walk_lineage("models:/rlhf-policy/latest", store.client)
    by_run = walk_lineage(f"runs:/{store.dpo}/model", store.client)
    by_id = walk_lineage(store.dpo, store.client)
    assert by_version.registered == by_latest.registered
    assert by_version.children[0].to_dict() == by_latest.children[0].to_dict()
    assert by_version.children[0].to_dict() == by_alias.children[0].to_dict()
    # Starting from the run skips the registry node; the stage subtree is the same.
    assert by_run.to_dict()["children"] == by_alias.children[0].to_dict()["children"]
    assert by_id.digests() == by_run.digests() == by_alias.digests()


def test_missing_upstream_run_is_reported_with_role_and_id(store: Store) -> None:
    # Given a PPO run whose reward-model pointer names a run that was never written.
    exp = store.client.get_run(store.dpo).info.experiment_id
    ppo = _stage_run(
        store.client,
        exp,
        store.parent,
        "ppo",
        {
            "rlhf.upstream.policy.run_id": store.sft,
            "rlhf.upstream.reward_model.run_id": NEVER_WRITTEN,
            "rlhf.upstream.reward_model.model_uri": f"runs:/{NEVER_WRITTEN}/model",
        },
        {"ppo.kl_coef": "0.05"},
    )

    tree = walk_lineage(f"runs:/{ppo}/model", store.client)

    # Then the rest of the lineage is still walked and the hole is named precisely.
    policy, reward_model = tree.children
    assert policy.stage == "sft" and policy.digests()["validate/prompts"] == DIGESTS["prompts"]
    assert reward_model.kind == "missing" and reward_model.run_id == NEVER_WRITTEN
    assert tree.problems() == [f"upstream 'reward_model': run {NEVER_WRITTEN} not found in the tracking store"]
    assert tree.to_dict()["children"][1]["error"] == tree.problems()[0]


def test_unknown_alias_or_run_raises_a_clear_error(store: Store) -> None:
    with pytest.raises(LineageError, match="champion"):
        walk_lineage("models:/rlhf-policy@champion", store.client)
    with pytest.raises(LineageError, match=f"run {NEVER_WRITTEN} .* does not exist"):
        walk_lineage(f"runs:/{NEVER_WRITTEN}/model", store.client)
    with pytest.raises(LineageError, match="expected models:/"):
        walk_lineage("hf://some/model", store.client)
