"""Preference collection: sample K responses per prompt, rank them with a judge, train a reward model on them.

Given the tiny offline model and prompts of the bundled support-bot task:
- when K responses are sampled per prompt, then the task file records them with their ids, the model and the
  sampling settings, and the same config writes the same file;
- when the gold judge ranks them, then each prompt expands to K(K−1)/2 pairs ordered by the gold score, the
  rows pass the ranking schema, and their digest is stable;
- label noise flips the share of answers it promises; a user's judge is found by "module:function";
- a reward model trained on the collected rankings beats chance on held-out pairs;
- the Prefect task records the collection in MLflow with lineage to the policy and the prompts (judge: one
  run; human: a first run that stops with the labeling command, a second that picks up the answers).
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flows.config import PipelineConfig
from rlhf_core.collection import (
    CollectConfig,
    JudgeLabeler,
    append_answer,
    collect_rankings,
    create_task_file,
    item_id,
    label_with_judge,
    read_task_file,
    split_by_item,
)
from rlhf_core.generation import SamplingConfig
from rlhf_core.judges import resolve_judge, reward_model_scorer
from rlhf_core.models import reward_model_from_causal_lm, score_sequences
from rlhf_core.support_bot import gold_score
from rlhf_core.tokenization import collate_right_padded, encode_prompt_response
from rlhf_core.trainers.reward import RewardConfig, train_reward_model
from rlhf_core.trainers.sft import SFTConfig, train_sft
from schemas import content_digest, load_rows, ranking_to_pairs
from tasks import tracking
from tasks.collect import LabelsPending, collect_task
from tasks.pointers import StagePointer
from tasks.runner import StageEnv
from tasks.validate import store_rows

REPO = Path(__file__).resolve().parent.parent
PROMPTS_FILE = REPO / "data" / "support_bot" / "prompts_train.jsonl"
K = 4
SAMPLING = SamplingConfig(max_new_tokens=24, temperature=1.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads on the shared cores; restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _prompts(n: int) -> list[dict]:
    with open(PROMPTS_FILE) as handle:
        return [json.loads(line) for line in handle][:n]


@pytest.fixture(scope="module")
def collected(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[CollectConfig, Path, list]:
    config = CollectConfig(num_responses=K, sampling=SAMPLING, batch_size=4, seed=3, judge="gold")
    task_file = tmp_path_factory.mktemp("collect") / "tasks.jsonl"
    items = create_task_file(tiny_model_dir, _prompts(10), config, task_file, device="cpu")
    return config, task_file, items


def test_task_file_holds_k_candidates_per_prompt_with_the_sampling_settings(collected, tiny_model_dir, tmp_path):
    """Given 10 prompts in batches of 4, then 10 items of K responses, each recording the model and the
    sampling settings with its batch's seed; the same config samples a byte-identical file."""
    config, task_file, items = collected
    prompts = _prompts(10)
    assert [item["prompt"] for item in items] == [p["prompt"] for p in prompts]
    assert read_task_file(task_file) == items
    for index, item in enumerate(items):
        assert [r["id"] for r in item["responses"]] == ["r0", "r1", "r2", "r3"]
        assert item["item_id"] == item_id(index, item["prompt"], [r["text"] for r in item["responses"]])
        assert item["model"] == str(tiny_model_dir)
        assert item["sampling"] == {
            "max_new_tokens": 24,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "do_sample": True,
            "seed": 3 + index // 4,
            "precision": "fp32",
        }
    again = create_task_file(tiny_model_dir, prompts, config, tmp_path / "again.jsonl", device="cpu")
    assert (tmp_path / "again.jsonl").read_bytes() == task_file.read_bytes() and again == items
    other = create_task_file(tiny_model_dir, prompts[:4], replace(config, seed=4), tmp_path / "o.jsonl", device="cpu")
    assert [r["text"] for r in other[0]["responses"]] != [r["text"] for r in items[0]["responses"]]


def test_gold_judge_rankings_expand_to_all_pairs_and_pass_the_ranking_schema(collected, tmp_path):
    """Given the gold judge, then a prompt whose K responses score K distinct values gives K(K−1)/2 pairs (m
    distinct values: m(m−1)/2, equal scores being ties, not preferences), each pair's chosen response has the
    higher gold score, the rows load through the ranking schema, and the digest is the same on a relabeling."""
    _, task_file, items = collected
    result = label_with_judge(items, JudgeLabeler(gold_score, noise=0.0, seed=0), tmp_path / "answers")
    distinct = [len({gold_score(item["prompt"], r["text"]) for r in item["responses"]}) for item in items]
    assert distinct.count(K) >= 1 and min(distinct) < K, f"need both full rankings and ties to test: {distinct}"
    assert all(len({r["text"] for r in item["responses"] if r["text"].strip()}) == K for item in items)
    rows = dict(zip(result.row_items, result.rows, strict=True))
    for item, m in zip(items, distinct, strict=True):
        if m < 2:
            assert item["item_id"] not in rows
            continue
        pairs = ranking_to_pairs(rows[item["item_id"]])
        assert len(pairs) == m * (m - 1) // 2
        for pair in pairs:
            assert gold_score(pair["prompt"], pair["chosen"]) > gold_score(pair["prompt"], pair["rejected"])
    assert result.counts["collect/pairs"] == sum(m * (m - 1) // 2 for m in distinct)
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in result.rows))
    loaded = load_rows(path, "ranking")
    assert [dict(row) for row in loaded.rows] == result.rows
    assert collect_rankings(task_file, tmp_path / "answers") == result.rows
    again = label_with_judge(items, JudgeLabeler(gold_score, noise=0.0, seed=0))
    assert content_digest(again.rows) == content_digest(result.rows)
    noisy = label_with_judge(items, JudgeLabeler(gold_score, noise=1.0, seed=0))
    assert content_digest(noisy.rows) != content_digest(result.rows)


def _synthetic_items(n: int, k: int) -> list[dict]:
    return [
        {
            "item_id": f"{i:05d}",
            "prompt": f"p{i}",
            "responses": [{"id": f"r{r}", "text": f"{(i * 7 + r * 3) % 11} {r}"} for r in range(k)],
        }
        for i in range(n)
    ]


def _length_judge(prompt: str, response: str) -> float:
    return float(response.split()[0])


def test_label_noise_randomises_the_promised_share_of_answers():
    """Given noise 0.3 over 3000 items of 4 responses, then ≈30% of answers are random orders (binomial, 4σ),
    those disagree with the judge on ≈½ of their pairs, the others on none; the labels of an item do not depend
    on the other items labeled, and noise 0 reproduces the judge's order exactly."""
    items, noise = _synthetic_items(3000, 4), 0.3
    answers = JudgeLabeler(_length_judge, noise=noise, seed=7).label(items)
    clean = JudgeLabeler(_length_judge, noise=0.0, seed=7).label(items)
    assert not any(a["noisy"] for a in clean)
    for answer in clean:
        scores = [answer["scores"][i] for i in answer["order"]]
        assert scores == sorted(scores, reverse=True)
    share = sum(a["noisy"] for a in answers) / len(items)
    assert abs(share - noise) < 4 * math.sqrt(noise * (1 - noise) / len(items))

    def disagreement(answer: dict, reference: dict) -> float:
        rank = {r: i for i, r in enumerate(reference["order"])}
        order = answer["order"]
        flipped = sum(rank[order[i]] > rank[order[j]] for i in range(4) for j in range(i + 1, 4))
        return flipped / 6

    noisy = [disagreement(a, c) for a, c in zip(answers, clean, strict=True) if a["noisy"]]
    kept = [disagreement(a, c) for a, c in zip(answers, clean, strict=True) if not a["noisy"]]
    assert kept == [0.0] * len(kept)
    mean = sum(noisy) / len(noisy)
    stderr = math.sqrt(sum((d - mean) ** 2 for d in noisy) / (len(noisy) - 1) / len(noisy))
    assert abs(mean - 0.5) < 4 * stderr
    subset = JudgeLabeler(_length_judge, noise=noise, seed=7).label(items[100:110])
    assert [a["order"] for a in subset] == [a["order"] for a in answers[100:110]]


def test_a_user_judge_is_imported_by_module_and_function_name(tmp_path, monkeypatch):
    """Given a module of the user's on the path, when the judge is "module:function", then its scores rank;
    a malformed name or a missing function fails clearly."""
    (tmp_path / "my_judge.py").write_text(
        textwrap.dedent("""
        def shortest_first(prompt, response):
            return -len(response)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = resolve_judge("my_judge:shortest_first")
    item = {
        "item_id": "x",
        "prompt": "p",
        "responses": [{"id": "a", "text": "long answer"}, {"id": "b", "text": "short"}, {"id": "c", "text": "mid one"}],
    }
    assert JudgeLabeler(judge).answer(item)["order"] == ["b", "c", "a"]
    with pytest.raises(ValueError, match="module:function"):
        resolve_judge("my_judge")
    with pytest.raises(AttributeError):
        resolve_judge("my_judge:missing")
    with pytest.raises(ValueError, match="finite"):
        JudgeLabeler(lambda p, r: float("nan")).answer(item)


def test_reward_model_scorer_batches_like_one_forward_pass_per_response(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Given a reward model on disk, then the scorer's batched scores equal `score_sequences` run one response at
    a time on the trainer's encoding (padding changes nothing), to 1e-5."""
    model = reward_model_from_causal_lm(tiny_model_dir, dtype=torch.float32, seed=1).eval()
    model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    prompt, responses = "Where is my order?", ["It ships today.", "Sorry!", "Let me check order 1234 for you now."]
    scorer = reward_model_scorer(tmp_path / "rm", device="cpu", batch_size=2)
    expected = []
    for response in responses:
        batch = collate_right_padded(
            [encode_prompt_response(tiny_tokenizer, prompt, response, 256, 256)], tiny_tokenizer.pad_token_id
        )
        with torch.no_grad():
            expected.append(float(score_sequences(model, batch["input_ids"], batch["attention_mask"])[0]))
    assert scorer.score_batch(prompt, responses) == pytest.approx(expected, abs=1e-5)
    assert scorer(prompt, responses[1]) == pytest.approx(expected[1], abs=1e-5)
    order = JudgeLabeler(scorer).answer(
        {"item_id": "i", "prompt": prompt, "responses": [{"id": f"r{i}", "text": t} for i, t in enumerate(responses)]}
    )["order"]
    assert order == [f"r{i}" for i in sorted(range(3), key=lambda i: -expected[i])]


# --------------------------------------------------------------------------------------------------------------
# Done when: a reward model trained on collected rankings beats chance on held-out pairs
# --------------------------------------------------------------------------------------------------------------

RM_PROMPTS = 200
DEMOS_FILE = REPO / "data" / "support_bot" / "demonstrations.jsonl"


def test_reward_model_trained_on_collected_rankings_beats_chance(tiny_model_dir, tmp_path):
    """Given the tiny model briefly fine-tuned on the bundled demonstrations (collection samples from the SFT
    model, as in the pipeline), K=4 of its responses to 200 prompts ranked by the gold judge and split by prompt,
    when a reward model is trained on the training rankings, then its accuracy on the held-out prompts' pairs is
    above ½ by more than 3 binomial standard errors (so not by luck)."""
    with open(DEMOS_FILE) as handle:
        demos = [json.loads(line) for line in handle]
    short = {"progress_bar": False, "batch_size": 8, "max_prompt_len": 64, "seed": 0}
    sft = train_sft(
        SFTConfig(max_steps=100, learning_rate=3e-3, max_response_len=48, **short),
        tiny_model_dir,
        demos,
        [],
        tmp_path / "sft",
    )
    config = CollectConfig(
        num_responses=K,
        sampling=replace(SAMPLING, max_new_tokens=32),
        batch_size=16,
        seed=0,
        eval_fraction=0.25,
        judge="gold",
    )
    items = create_task_file(sft.model_dir, _prompts(RM_PROMPTS), config, tmp_path / "tasks.jsonl", device="cpu")
    result = label_with_judge(items, JudgeLabeler(gold_score, seed=0))
    train_rows, eval_rows = split_by_item(result, config.eval_fraction, config.seed)
    assert {json.dumps(r["prompt"]) for r in train_rows}.isdisjoint({json.dumps(r["prompt"]) for r in eval_rows})
    rm_config = RewardConfig(max_steps=60, learning_rate=1e-3, max_response_len=32, **short)
    trained = train_reward_model(rm_config, sft.model_dir, train_rows, [], tmp_path / "rm")
    scorer = reward_model_scorer(trained.model_dir, device="cpu", max_prompt_len=64, max_response_len=32)
    pairs = [pair for row in eval_rows for pair in ranking_to_pairs(row)]
    wins = sum(scorer(p["prompt"], p["chosen"]) > scorer(p["prompt"], p["rejected"]) for p in pairs)
    accuracy, n = wins / len(pairs), len(pairs)
    assert n >= 50, f"only {n} held-out pairs"
    assert accuracy > 0.5 + 3 * math.sqrt(0.25 / n), f"held-out pair accuracy {accuracy:.3f} on {n} pairs"


# --------------------------------------------------------------------------------------------------------------
# The Prefect task and its MLflow record
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_env(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[StageEnv, StagePointer, StagePointer]:
    """One MLflow SQLite store for the module (creating one costs seconds); the tests differ in settings, so
    their stage and collection directories differ too."""
    config = PipelineConfig(
        name="collect-test",
        work_dir=str(tmp_path_factory.mktemp("work")),
        stages=["validate"],
        tracking={"system_metrics": False},
    )
    client = tracking.tracking_client(config.tracking_uri())
    experiment_id = tracking.ensure_experiment(client, "collect-test", config.artifact_location())
    parent = client.create_run(experiment_id, run_name="parent", tags={"rlhf.kind": "pipeline"}).info.run_id
    env = StageEnv(config=config, parent_run_id=parent, experiment_id=experiment_id)
    prompts = store_rows(config.work_path(), "prompts_train", "prompt", _prompts(6), str(PROMPTS_FILE))
    validated = StagePointer(stage="validate", cache_key="v" * 64, run_id=None, datasets={"prompts_train": prompts})
    policy = StagePointer(stage="sft", cache_key="s" * 64, model_uri=str(tiny_model_dir), model_dir=str(tiny_model_dir))
    return env, validated, policy


def test_collect_task_records_the_rankings_with_lineage_and_is_cached(stage_env):
    """Given the judge labeler, when the task runs, then one FINISHED `collect` run carries the policy and prompt
    lineage, the ranking datasets with our digests, the counts and the task file; a second call reuses it."""
    env, validated, policy = stage_env
    settings = CollectConfig(num_responses=3, sampling=SAMPLING, batch_size=4, eval_fraction=0.34, judge="gold")
    pointer = collect_task.fn(env, validated, policy, settings)
    assert set(pointer.datasets) == {"preference_train", "preference_eval"}
    train = load_rows(pointer.datasets["preference_train"].path, "ranking")
    held = load_rows(pointer.datasets["preference_eval"].path, "ranking")
    assert len(train.rows) >= 1 and len(held.rows) >= 1
    run = env.client.get_run(pointer.run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["rlhf.stage"] == "collect"
    assert tags["rlhf.upstream.policy.model_uri"] == policy.model_uri
    assert tags["rlhf.data.prompts_train.digest"] == validated.datasets["prompts_train"].digest
    for name in ("preference_train", "preference_eval"):
        assert (
            tags[f"rlhf.data.{name}.digest"]
            == pointer.datasets[name].digest
            == content_digest(read_rows_of(pointer.datasets[name].path))
        )
    contexts = {
        i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs
    }
    assert contexts == {"prompts_train": "training", "preference_train": "collected", "preference_eval": "collected"}
    rankings = list(train.rows) + list(held.rows)
    assert run.data.metrics["collect/pairs"] == sum(
        len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in rankings
    )
    assert run.data.metrics["collect/items"] == 6
    assert run.data.metrics["collect/rankings"] == len(rankings)
    assert run.data.params["collect.num_responses"] == "3"
    artifacts = {a.path for a in env.client.list_artifacts(pointer.run_id, "collection")}
    assert "collection/tasks.jsonl" in artifacts and "collection/answers" in artifacts
    again = collect_task.fn(env, validated, policy, settings)
    assert again.reused and again.run_id == pointer.run_id


def read_rows_of(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_human_collection_is_a_two_step_run(stage_env):
    """Given the human labeler, when the task first runs, then it writes the task file and stops with the
    labeling command and no stage run; when answers arrive and it runs again, then the rankings are theirs."""
    env, validated, policy = stage_env
    settings = CollectConfig(num_responses=3, sampling=SAMPLING, labeler="human", eval_fraction=0.0)
    with pytest.raises(LabelsPending) as pending:
        collect_task.fn(env, validated, policy, settings)
    task_file = pending.value.task_file
    assert f"rlhf label {task_file}" in str(pending.value) and "0 of 6 items answered" in str(pending.value)
    human_runs = "tags.rlhf.stage = 'collect' and tags.rlhf.collect.labeler = 'human'"
    assert env.client.search_runs([env.experiment_id], human_runs) == []
    items = read_task_file(task_file)
    for n, item in enumerate(items):
        action = "skip" if n == 5 else "rank"
        answer = {"item_id": item["item_id"], "labeler": "ann", "action": action}
        if action == "rank":
            answer["order"] = ["r2", "r0", "r1"]
        append_answer(pending.value.answers_dir, answer)
    pointer = collect_task.fn(env, validated, policy, settings)
    rows = load_rows(pointer.datasets["preference_train"].path, "ranking").rows
    assert [dict(r) for r in rows] == collect_rankings(task_file, pending.value.answers_dir)
    assert [list(r["responses"]) for r in rows] == [[it["responses"][i]["text"] for i in (2, 0, 1)] for it in items[:5]]
    run = env.client.get_run(pointer.run_id)
    assert [r.info.run_id for r in env.client.search_runs([env.experiment_id], human_runs)] == [pointer.run_id]
    assert run.data.metrics["collect/skipped"] == 1
    assert run.data.params["collect.answers_digest"] == content_digest([dict(r) for r in rows])
