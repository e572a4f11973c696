"""`@champion` follows the better policy, by a hand-made table of evaluation scores, in a real MLflow registry.

Given three candidate policies registered in turn with gold scores 1.0, 0.6 and 1.4 (hand-made evaluation
pointers), then `@candidate` always points at the newest version, while `@champion` goes to the first, stays on it
when the worse second arrives, and moves to the third: the version with the highest score, computed here by hand.
"""

from __future__ import annotations

from pathlib import Path

from flows.config import parse_config
from flows.pipeline import register_policy, start_pipeline_run
from tasks import tracking
from tasks.pointers import StagePointer

SCORES = [1.0, 0.6, 1.4]  # by hand: champion after each registration = version 1, 1, 3


def test_champion_moves_only_to_a_better_policy(tmp_path: Path) -> None:
    config = parse_config(
        {
            "name": "promotion",
            "work_dir": str(tmp_path / "runs"),
            "datasets": {
                "demonstrations": {"path": "d.jsonl"},
                "preferences": {"path": "p.jsonl"},
                "prompts_eval": {"path": "e.jsonl"},
            },
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "promotion"},
        }
    )
    env = start_pipeline_run(config)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    champions, candidates = [], []
    for i, score in enumerate(SCORES):
        run_id = env.client.create_run(env.experiment_id, run_name=f"dpo-{i}").info.run_id
        uri = tracking.log_model_dir(env.client, run_id, model_dir)
        policy = StagePointer(stage="dpo", cache_key=f"k{i}", run_id=run_id, model_uri=uri, model_dir=str(model_dir))
        evaluation = StagePointer(
            stage="evaluate",
            cache_key=f"e{i}",
            run_id=run_id,
            metrics={"eval/gold_score": score, "eval/rm_score": -score},
        )
        registered = register_policy(env, policy, evaluation)
        candidates.append(registered.version)
        champions.append(str(env.client.get_model_version_by_alias("rlhf-policy", "champion").version))
        assert registered.promoted == (registered.version == champions[-1])
    assert candidates == ["1", "2", "3"]
    best_so_far = [str(1 + max(range(i + 1), key=lambda j: SCORES[j])) for i in range(len(SCORES))]
    assert champions == best_so_far == ["1", "1", "3"]
    assert str(env.client.get_model_version_by_alias("rlhf-policy", "candidate").version) == "3"


def test_the_champion_is_judged_in_the_same_evaluation_as_the_candidate(tmp_path: Path) -> None:
    # Given a champion whose own (older) evaluation stored 1.4, on other prompts.
    config = parse_config(
        {
            "name": "promotion",
            "work_dir": str(tmp_path / "runs"),
            "datasets": {
                "demonstrations": {"path": "d.jsonl"},
                "preferences": {"path": "p.jsonl"},
                "prompts_eval": {"path": "e.jsonl"},
            },
            "tracking": {
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "experiment_name": "promotion",
                "promotion_metric": "eval/win_rate_gold",
            },
        }
    )
    env = start_pipeline_run(config)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")

    def register(i: int, own: float, champion_now: float | None) -> bool:
        run_id = env.client.create_run(env.experiment_id, run_name=f"dpo-{i}").info.run_id
        uri = tracking.log_model_dir(env.client, run_id, model_dir)
        per_model = {"policy": {"eval/win_rate_gold": own}}
        if champion_now is not None:
            per_model["champion"] = {"eval/win_rate_gold": champion_now}
        evaluation = StagePointer(
            stage="evaluate",
            cache_key=f"e{i}",
            run_id=run_id,
            metrics={"eval/win_rate_gold": own},
            extra={"per_model": per_model},
        )
        policy = StagePointer(stage="dpo", cache_key=f"k{i}", run_id=run_id, model_uri=uri, model_dir=str(model_dir))
        return register_policy(env, policy, evaluation).promoted

    assert register(0, 0.9, None)  # the first policy becomes champion
    # When a candidate scores 0.8 while the champion, re-scored beside it on the same prompts, scores 0.7, then
    # the candidate wins although the champion's stored 0.9 is higher; and the reverse does not promote.
    assert register(1, 0.8, 0.7)
    assert not register(2, 0.85, 0.95)
    assert str(env.client.get_model_version_by_alias("rlhf-policy", "champion").version) == "2"
