"""The `rlhf` command line, invoked as a user would (typer's CliRunner, real files, real MLflow stores).

- validate: a good file prints its row count and digest; a bad one exits 1 naming file, row, column and rule.
- generate: from a local tiny model directory, and the same text from the same model logged to MLflow
  (`runs:/…/model`, `models:/…@alias`), downloaded once into the cache.
- lineage: the tree of a store built with the tags of docs/lineage.md, as text and as JSON; holes exit 2.
- ui: stopped with SIGTERM, it stops its server's whole process group.
(`rlhf run` end to end and `rlhf ui` are tested with the servers, in tests/test_deployment.py.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from test_lineage import DIGESTS, NEVER_WRITTEN, build_store
from typer.testing import CliRunner

from flows.cli import app
from flows.lineage import walk_lineage

# MLflow cannot tell which of its local sources a relative dataset path is; irrelevant to lineage.
pytestmark = pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")
REPO = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "250"}  # rich wraps at the terminal width; keep digests and ids on one line


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_run_help_lists_config_and_overrides(runner: CliRunner) -> None:
    result = runner.invoke(app, ["run", "--help"], env=WIDE)
    assert result.exit_code == 0
    assert "Usage: rlhf run" in result.output and "Pipeline YAML" in result.output
    assert "--set" in result.output and "Override one config key" in result.output
    assert "--tracking-uri" in result.output and "--verbose" in result.output


TINY_STAGE = {"batch_size": 4, "max_prompt_len": 48, "max_response_len": 32}


@pytest.mark.slow
def test_run_without_a_terminal_shows_stage_lines_progress_lines_and_the_result_but_no_library_info(
    tmp_path: Path,
) -> None:
    """`rlhf run` as its own process, its output a pipe (not a terminal), on a tiny pipeline (~40 s)."""
    data = REPO / "data" / "support_bot"
    config = {
        "name": "quiet",
        "base_model": "tiny",
        "algorithm": "dpo",
        "work_dir": str(tmp_path / "runs"),
        "datasets": {
            "demonstrations": {"path": str(data / "demonstrations.jsonl"), "limit": 24},
            "preferences": {"path": str(data / "preferences.jsonl"), "limit": 24},
            "prompts_train": {"path": str(data / "prompts_train.jsonl"), "limit": 8},
            "prompts_eval": {"path": str(data / "prompts_eval.jsonl"), "limit": 4},
            "eval_fraction": 0.25,
        },
        "sft": {**TINY_STAGE, "max_steps": 3},
        "reward_model": {**TINY_STAGE, "max_steps": 3},
        "dpo": {**TINY_STAGE, "max_steps": 2},
        "evaluation": {"sampling": {"max_new_tokens": 8}, "num_prompts": 4, "batch_size": 4},
        "lengths": {"allow_truncation": True},
        "tracking": {"experiment_name": "quiet", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **WIDE, "PREFECT_HOME": str(tmp_path / "prefect")}
    for name in ("PREFECT_API_URL", "MLFLOW_LOGGING_LEVEL", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):
        env.pop(name, None)

    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    out, err = proc.stdout, proc.stderr
    # No INFO records of MLflow (database set-up, system metrics) or Prefect (server, task states).
    assert not [line for line in (out + err).splitlines() if re.search(r"\bINFO\b", line)], out + err
    stages = ["validate", "sft", "reward_model", "dpo", "evaluate"]
    for i, stage in enumerate(stages, start=1):
        assert f"[{i}/5] ▶ {stage} started" in out and f"[{i}/5] ✔ {stage} completed in " in out, out
    # The trainers' progress: plain lines on stderr instead of bars (no terminal).
    for stage, steps in (("sft", 3), ("rm", 3), ("dpo", 2)):
        assert re.search(rf"^{stage}: step {steps}/{steps} \(100%\), \w+=[-0-9.]+, \d+ s elapsed$", err, re.M), err
    assert "\r" not in err  # no bar redrawn in place
    # The evaluation table at the end.
    table = out.split("result")[-1]
    assert "gold ± s.e." in table and re.search(r"^sft\s", table, re.M) and re.search(r"^policy\s", table, re.M)
    # The lines a user sees: the header, one per stage start and end, the where-to-look block, the table.
    assert len(out.splitlines()) < 45, out

    # Run again: every stage is reused, and the stage lines (from the tasks' Prefect state hooks) say so.
    again = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr[-4000:]
    for i, stage in enumerate(stages, start=1):
        assert re.search(rf"\[{i}/5\] ✔ {stage} reused from the cache in \d+\.\d s", again.stdout), again.stdout


def test_run_rejects_a_bad_config_key_before_running(runner: CliRunner, tmp_path: Path) -> None:
    # Given a config with a misspelt key; when run; then exit 2 naming the key, and nothing ran.
    config = tmp_path / "bad.yaml"
    config.write_text(f"name: bad\nwork_dir: {tmp_path / 'work'}\nsft:\n  max_stepz: 3\n")
    result = runner.invoke(app, ["run", str(config)], env=WIDE)
    assert result.exit_code == 2
    assert "sft.max_stepz: unexpected key" in result.output
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, a non-zero exit, no traceback (unless --debug)
# ---------------------------------------------------------------------------------------------------------------


def _one_clear_line(result, *words: str) -> str:  # noqa: ANN001
    """The error line of a failed command: a single line on stderr holding `words`, and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("syntax.yaml", b"name: x\nsft: [1, 2\n", ("not valid YAML", "line 3")),
        ("binary.yaml", bytes(range(256)) * 4, ("not a UTF-8 text file", "byte 0x80")),
        ("tab.yaml", b"name: x\n\tsft: 1\n", ("not valid YAML", "line 2")),
    ],
)
def test_run_reports_an_unreadable_config_in_one_line(
    runner: CliRunner, tmp_path: Path, name: str, content: bytes, words: tuple[str, ...]
) -> None:
    # Given a config with a YAML syntax error or binary bytes; when run; then exit 2 with one line naming the file.
    config = tmp_path / name
    config.write_bytes(content)
    result = runner.invoke(app, ["run", str(config)], env=WIDE)
    assert result.exit_code == 2
    _one_clear_line(result, str(config), *words)


def test_run_reports_a_malformed_override_in_one_line(runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text(f"name: ok\nwork_dir: {tmp_path / 'work'}\n")
    result = runner.invoke(app, ["run", str(config), "--set", "sft.max_steps=[1"], env=WIDE)
    assert result.exit_code == 2
    _one_clear_line(result, "sft.max_steps", "not valid YAML")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"item_id": "a", "prompt": "p"\n', (":1:", "not JSON")),
        (b'{"item_id": "a", "prompt": "p", "responses": 5}\n', (":1:", "responses must be")),
        (
            b'{"item_id": ["a"], "prompt": "p", "responses": [{"id": "r0", "text": "x"}, {"id": "r1", "text": "y"}]}\n',
            (":1:", "item_id must be"),
        ),
        (b"\xff\xfe binary", ("not UTF-8",)),
    ],
)
def test_label_reports_a_malformed_task_file_in_one_line(
    runner: CliRunner, tmp_path: Path, content: bytes, words: tuple[str, ...]
) -> None:
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_bytes(content)
    result = runner.invoke(app, ["label", str(task_file), "--port", "0"], env=WIDE)
    assert result.exit_code == 2
    _one_clear_line(result, str(task_file), *words)


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a command that fails in a way nobody planned for; then one line naming the error and --debug ...
    import flows.labeling_app

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(flows.labeling_app, "serve_server", broken)
    responses = [{"id": "r0", "text": "a"}, {"id": "r1", "text": "b"}]
    task_file = _jsonl(tmp_path / "tasks.jsonl", [{"item_id": "0", "prompt": "p", "responses": responses}])
    result = runner.invoke(app, ["label", str(task_file), "--port", "0"], env=WIDE)
    assert result.exit_code == 1
    _one_clear_line(result, "RuntimeError: the disk caught fire", "--debug")
    # ... and with --debug, the exception with its traceback.
    result = runner.invoke(app, ["--debug", "label", str(task_file), "--port", "0"], env=WIDE)
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{")
    result = runner.invoke(app, ["--debug", "label", str(bad)], env=WIDE)
    assert isinstance(result.exception, ValueError) and "not JSON" in str(result.exception)


# ---------------------------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------------------------

GOOD = [
    {"prompt": "Where is my order?", "chosen": "Let me check it for you.", "rejected": "No idea."},
    {
        "prompt": [{"role": "user", "content": "Refund please"}],
        "chosen": [{"role": "assistant", "content": "Done."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    {"prompt": "Reset my password", "chosen": "Use 'Forgot password'.", "rejected": "Can't help."},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_validate_good_data_prints_counts_and_the_content_digest(runner: CliRunner, tmp_path: Path) -> None:
    from schemas import content_digest, load_rows

    data = _jsonl(tmp_path / "prefs.jsonl", GOOD)
    result = runner.invoke(app, ["validate", str(data), "--kind", "preference"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"{data}: 3 valid preference rows (1 conversational, 2 plain text)" in result.output
    assert f"digest {content_digest(list(load_rows(data, 'preference').rows))}" in result.output


def test_validate_bad_data_exits_1_with_the_precise_report(runner: CliRunner, tmp_path: Path) -> None:
    from schemas import DataValidationError, load_rows

    # Given preference data whose third row lacks `rejected`.
    data = _jsonl(tmp_path / "broken.jsonl", [*GOOD[:2], {"prompt": "Hi", "chosen": "Hello!"}])
    with pytest.raises(DataValidationError) as expected:
        load_rows(data, "preference")

    result = runner.invoke(app, ["validate", str(data), "--kind", "preference"], env=WIDE)

    # Then exit 1, and the library's full report (naming the file and the column) is what the user sees.
    assert result.exit_code == 1
    assert f"{data} is not valid preference data" in result.output
    report = str(expected.value)
    assert "broken.jsonl" in report and "rejected" in report
    assert all(line.strip() in result.output for line in report.splitlines() if line.strip())


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [{"prompt": "Hi", "chosen": "Hello!"}, {"prompt": "Yo", "chosen": "Hey"}],
            ["column 'rejected': [required] column missing from every row"],
        ),
        ([{**GOOD[0], "score": 1}], ["row 1 (line 1), column 'score': [unknown_column]"]),
        ([{"prompt": 7, "chosen": "a", "rejected": "b"}], ["row 1 (line 1), column 'prompt': [type]"]),
    ],
)
def test_validate_reports_schema_level_failures_like_row_level_ones(
    runner: CliRunner, tmp_path: Path, rows: list[dict], expected: list[str]
) -> None:
    # Given a file lacking a whole column, with an extra column or a value of the wrong type; then exit 1 and the
    # report names file, column and rule (a missing column used to crash the explainer: int(None)).
    data = _jsonl(tmp_path / "prefs.jsonl", rows)
    result = runner.invoke(app, ["validate", str(data), "--kind", "preference"], env=WIDE)
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert "Traceback" not in result.output
    for line in expected:
        assert f"{data}, {line}" in result.stderr, result.stderr


def test_validate_rejects_an_unknown_kind(runner: CliRunner, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "prefs.jsonl", GOOD)
    result = runner.invoke(app, ["validate", str(data), "--kind", "preferences"], env=WIDE)
    assert result.exit_code == 2 and "unknown kind 'preferences'" in result.output


# ---------------------------------------------------------------------------------------------------------------
# lineage
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return build_store(tmp_path_factory.mktemp("cli_lineage"))


def test_lineage_prints_the_tree_down_to_every_digest(runner: CliRunner, store) -> None:  # noqa: ANN001
    result = runner.invoke(app, ["lineage", "models:/rlhf-policy@candidate", "--tracking-uri", store.uri], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rlhf-policy v1 @candidate" in out
    for stage, run_id in (("dpo", store.dpo), ("sft", store.sft), ("validate", store.validate)):
        assert f"{stage} run {run_id}" in out
    for digest in DIGESTS.values():
        assert digest in out
    assert "base model /models/tiny-base" in out and "dpo.dpo_beta = 0.1" in out
    # DPO's `reference` and `sft` are the same SFT run: its details are printed once.
    assert out.count(f"sft run {store.sft}") == 2 and out.count("cache key key-sft") == 1
    assert f"sft ← sft run {store.sft} FINISHED pipeline {store.parent} (shown above)" in out


def test_lineage_json_is_the_walk(runner: CliRunner, store) -> None:  # noqa: ANN001
    uri = store.uri
    result = runner.invoke(app, ["lineage", f"runs:/{store.dpo}/model", "--json", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == walk_lineage(f"runs:/{store.dpo}/model", store.client).to_dict()


def test_lineage_exit_codes_name_the_problem(runner: CliRunner, store, tmp_path: Path) -> None:  # noqa: ANN001
    uri = store.uri
    # An alias nobody set: exit 1.
    result = runner.invoke(app, ["lineage", "models:/rlhf-policy@champion", "--tracking-uri", uri], env=WIDE)
    assert result.exit_code == 1 and "champion" in result.output
    # A run whose upstream was never written: the tree is printed, the hole named, exit 2.
    exp = store.client.get_run(store.dpo).info.experiment_id
    orphan = store.client.create_run(
        exp, tags={"rlhf.kind": "stage", "rlhf.stage": "dpo", "rlhf.upstream.sft.run_id": NEVER_WRITTEN}
    ).info.run_id
    result = runner.invoke(app, ["lineage", orphan, "--tracking-uri", uri], env=WIDE)
    assert result.exit_code == 2
    assert f"incomplete lineage: upstream 'sft': run {NEVER_WRITTEN} not found" in result.output


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with pipeline parent runs written the way `flows.pipeline` writes them, plus a stage run."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('cli_runs') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    quick, other = client.create_experiment("quickstart"), client.create_experiment("other")
    t0 = 1_796_000_000_000  # ms since the epoch

    def parent(
        exp: str,
        name: str,
        algorithm: str,
        start: int,
        metrics: dict[str, float],
        end: int | None,
        tags: dict[str, str] | None = None,
    ) -> str:
        run = client.create_run(
            exp,
            run_name=name,
            start_time=start,
            tags={"rlhf.kind": "pipeline", "rlhf.algorithm": algorithm, **(tags or {})},
        )
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value, step=0)
        if end is not None:
            client.set_terminated(run.info.run_id, end_time=end)
        return run.info.run_id

    parent(
        quick,
        "quickstart-dpo-20261205-090000",
        "dpo",
        t0,
        {
            "eval/gold_score": 1.554,
            "eval/win_rate_gold": 0.8,
            "eval/rm_score": 0.31,
            "eval/win_rate_rm": 0.7,
            "eval/kl_to_ref": 6.43,
            "eval/response_length": 21.25,
            "eval/no_eos_fraction": 0.03,
        },
        t0 + 45_000,
        {"rlhf.registered_model": "rlhf-policy/1", "rlhf.promoted": "true"},
    )
    parent(
        quick,
        "quickstart-ppo-20261205-091000",
        "ppo",
        t0 + 600_000,
        {"eval/gold_score": 1.42, "eval/win_rate_gold": 0.76, "eval/kl_to_ref": 2.3},
        t0 + 700_000,
    )
    parent(quick, "quickstart-ppo-20261205-092000", "ppo", t0 + 1_200_000, {}, None)  # still running
    client.create_run(quick, run_name="dpo", tags={"rlhf.kind": "stage", "rlhf.stage": "dpo"})
    parent(other, "other-dpo-20261205-080000", "dpo", t0 - 3_600_000, {"eval/win_rate_gold": 0.55}, t0)
    return uri


def _table_rows(output: str) -> list[list[str]]:
    """The cells of each pipeline run's row (columns are at least two spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in output.splitlines() if "-20261205-" in line]


def test_runs_lists_an_experiments_pipeline_runs_newest_first_with_their_evaluation(
    runner: CliRunner, pipeline_runs: str
) -> None:
    result = runner.invoke(app, ["runs", "--experiment", "quickstart", "--tracking-uri", pipeline_runs], env=WIDE)

    assert result.exit_code == 0, result.output
    assert "run  status  algo  started UTC  took  gold  gold win  RM win  KL  no EOS" in re.sub(
        r" {2,}", "  ", result.output
    )
    # Newest first; not the other experiment's run, not the stage run.
    assert _table_rows(result.output) == [
        ["quickstart-ppo-20261205-092000", "RUNNING", "ppo", "11-30 01:13", "–", "–", "–", "–", "–", "–"],
        ["quickstart-ppo-20261205-091000", "FINISHED", "ppo", "11-30 01:03", "100s", "1.42", "0.76", "–", "2.30", "–"],
        [
            "quickstart-dpo-20261205-090000",
            "FINISHED",
            "dpo",
            "11-30 00:53",
            "45s",
            "1.55",
            "0.80",
            "0.70",
            "6.43",
            "0.03",
        ],
    ]


def test_runs_limit_wide_every_experiment_and_an_unknown_one(runner: CliRunner, pipeline_runs: str) -> None:
    newest = runner.invoke(
        app, ["runs", "-n", "1", "--experiment", "quickstart", "--wide", "--tracking-uri", pipeline_runs], env=WIDE
    )
    assert newest.exit_code == 0, newest.output
    [row] = _table_rows(newest.output)
    assert row[0] == "quickstart-ppo-20261205-092000" and len(row) == 14 and re.fullmatch("[0-9a-f]{32}", row[-1])

    wide = runner.invoke(app, ["runs", "--wide", "--tracking-uri", pipeline_runs], env=WIDE)
    assert wide.exit_code == 0, wide.output
    rows = _table_rows(wide.output)
    assert [r[0] for r in rows] == [
        "quickstart-ppo-20261205-092000",
        "quickstart-ppo-20261205-091000",
        "quickstart-dpo-20261205-090000",
        "other-dpo-20261205-080000",
    ]
    assert rows[2][5:13] == ["1.55", "0.80", "0.31", "0.70", "6.43", "21.2", "0.03", "rlhf-policy v1 (champion)"]
    assert "experiments other, quickstart" in wide.output

    unknown = runner.invoke(app, ["runs", "--experiment", "nope", "--tracking-uri", pipeline_runs], env=WIDE)
    assert unknown.exit_code == 1
    assert unknown.stderr.strip() == (
        "error: no experiment 'nope' in this store (experiments: Default, other, quickstart)"
    )


# ---------------------------------------------------------------------------------------------------------------
# generate / chat
# ---------------------------------------------------------------------------------------------------------------

PROMPTS = ["My parcel is late.", "How do I reset my password?"]
SAMPLING = ["--seed", "7", "--max-new-tokens", "6", "--temperature", "0.9", "--top-p", "0.95"]


def _generate(runner: CliRunner, model: str, *extra: str) -> list[dict]:
    args = ["generate", model, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *SAMPLING, "--json", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_generate_from_a_local_directory_is_seeded_sampling_of_that_model(
    runner: CliRunner, tiny_model_dir: Path
) -> None:
    from rlhf_core.generation import SamplingConfig
    from rlhf_core.inference import generate_text, load_policy

    out = _generate(runner, str(tiny_model_dir))

    # Then: one response per prompt, exactly the library's seeded sample with the same settings.
    model, tokenizer = load_policy(tiny_model_dir)
    expected = generate_text(
        model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.95, seed=7)
    )
    assert out == [{"prompt": p, "response": r} for p, r in zip(PROMPTS, expected, strict=True)]
    assert _generate(runner, str(tiny_model_dir)) == out  # same seed, same text


def test_generate_from_mlflow_uris_downloads_once_and_matches_the_local_model(
    runner: CliRunner, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given the tiny model logged as a run's `model/` artifact and registered as rlhf-policy@champion.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("gen", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(tiny_model_dir), "model")
    client.create_registered_model("rlhf-policy")
    version = client.create_model_version("rlhf-policy", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("rlhf-policy", "champion", version.version)
    cache = tmp_path / "cache"
    flags = ("--tracking-uri", uri, "--cache-dir", str(cache))

    # When we generate from the alias and from the run URI; then the text is the local model's.
    local = _generate(runner, str(tiny_model_dir))
    assert _generate(runner, "models:/rlhf-policy@champion", *flags) == local
    assert _generate(runner, f"runs:/{run_id}/model", *flags) == local

    # The alias was resolved to its version before download; both downloads are complete HF directories.
    assert [p.name for p in (cache / "models" / "rlhf-policy" / "v1").rglob("*.safetensors")] == ["model.safetensors"]
    assert [p.name for p in (cache / "runs" / run_id / "model").rglob("*.safetensors")] == ["model.safetensors"]
    # A second call is served from the cache, even with the artifacts gone.
    shutil.rmtree(tmp_path / "artifacts")
    assert _generate(runner, "models:/rlhf-policy@champion", *flags) == local


def test_generate_refuses_pickle_weights(runner: CliRunner, tiny_model_dir: Path, tmp_path: Path) -> None:
    # Given a model directory whose weights are a pickle (torch.save), not safetensors.
    import torch
    from safetensors.torch import load_file

    unsafe = tmp_path / "unsafe"
    shutil.copytree(tiny_model_dir, unsafe, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_model_dir / "model.safetensors"), unsafe / "pytorch_model.bin")
    result = runner.invoke(app, ["generate", str(unsafe), "--prompt", "hi"], env=WIDE)
    assert result.exit_code == 2
    assert "only pickle-format weights (pytorch_model.bin)" in result.output


def test_generate_needs_exactly_one_prompt_source(runner: CliRunner, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n")
    result = runner.invoke(
        app, ["generate", str(tiny_model_dir), "--prompt", "x", "--prompts-file", str(prompts)], env=WIDE
    )
    assert result.exit_code == 2 and "not both" in result.output


def test_chat_answers_each_turn_until_exit(runner: CliRunner, tiny_model_dir: Path) -> None:
    result = runner.invoke(
        app,
        ["chat", str(tiny_model_dir), "--seed", "0", "--max-new-tokens", "4"],
        input="Hello there\n/reset\nMy order is late\n/exit\n",
        env=WIDE,
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("model > ") == 3  # two answers and the reset notice
    assert "model > (history cleared)" in result.output


# A stand-in for `mlflow ui`: a server process with a worker child (as gunicorn/uvicorn have), both pids written.
FAKE_SERVER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(f"{__import__('os').getpid()} {worker.pid}")
time.sleep(300)
"""

UI_WITH_FAKE_SERVER = """
import sys
import flows.cli as cli
cli.mlflow_ui_command = lambda *args, **kwargs: [sys.executable, "-c", sys.argv[1], sys.argv[2]]
cli.app(["ui", "--tracking-uri", sys.argv[3], "--artifact-root", sys.argv[4]], standalone_mode=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of the (now dead) server is reaped by init; until then it is a zombie.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_rlhf_ui_stopped_with_sigterm_stops_the_server_and_its_workers(tmp_path: Path) -> None:
    """Given `rlhf ui` running its server (which has a worker process), when `rlhf ui` gets SIGTERM (as from a
    service manager or `kill`), then it exits and neither the server nor its worker is left running."""
    pids = tmp_path / "pids"
    command = [
        sys.executable,
        "-c",
        UI_WITH_FAKE_SERVER,
        FAKE_SERVER,
        str(pids),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        (tmp_path / "art").as_uri(),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ui = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (pids.is_file() and len(pids.read_text().split()) == 2):
        assert ui.poll() is None, ui.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    server, worker = map(int, pids.read_text().split())
    try:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=30)
        deadline = time.monotonic() + 15
        while (_alive(server) or _alive(worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(server) and not _alive(worker), "rlhf ui left its server running"
    finally:
        for pid in (server, worker):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_rlhf_label_serves_the_page_and_saves_an_answer(tmp_path: Path) -> None:
    # Given a task file of two items and the real `rlhf label` command in its own process.
    from rlhf_core.collection import item_id, read_answers_file, write_jsonl_atomic

    items = [
        {
            "item_id": item_id(i, f"prompt {i}", ["a", "b"]),
            "prompt": f"prompt {i}",
            "model": "m",
            "responses": [
                {"id": "r0", "text": "a", "ended_with_eos": True},
                {"id": "r1", "text": "b", "ended_with_eos": True},
            ],
            "sampling": {"seed": 0},
        }
        for i in range(2)
    ]
    task_file = write_jsonl_atomic(items, tmp_path / "tasks.jsonl")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "label", str(task_file), "--port", "0", "--labeler", "ann"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        lines = []
        while not any("open http" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = next(line for line in lines if "open http" in line).split()[1].split("?")[0]
        # When a labeler answers the first item through the page's API.
        import urllib.request

        body = json.dumps(
            {
                "labeler": "ann",
                "item_id": items[0]["item_id"],
                "action": "rank",
                "order": ["r1", "r0"],
                "shown": ["r0", "r1"],
            }
        ).encode()
        request = urllib.request.Request(url + "api/answer", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    # Then the answer is on disk under the default answers directory, and Ctrl-C ended the server cleanly.
    assert "Labeling 2 items" in "".join(lines)
    answers = read_answers_file(tmp_path / "tasks.answers" / "ann.jsonl")
    assert [(a["item_id"], a["order"]) for a in answers] == [(items[0]["item_id"], ["r1", "r0"])]
    assert proc.returncode == 0
