"""Prefect task: preference collection — sample K responses per prompt from the policy (the SFT model by
default), have them ranked, and hand the reward model a validated ranking dataset with lineage.

    collect ← validate (prompts_train), policy (the model that sampled)    →    reward_model reads its rankings

Where things go (`<key>` hashes the policy's cache key, the prompts digest and the sampling settings — not the
code version, so answers given between two runs are still found after a code change):

    <work_dir>/collect/<key[:16]>/tasks.jsonl          the candidates (rlhf_core.collection task file)
    <work_dir>/collect/<key[:16]>/tasks.answers/       human answers, one <labeler>.jsonl each
    <work_dir>/data/preference_{train,eval}-<digest>.jsonl   the validated ranking rows (split by prompt)

Labeler `judge` runs unattended. Labeler `human` is a two-step run:

1. the first run samples the candidates, writes the task file and stops with `LabelsPending`, whose message
   gives the `rlhf label TASKFILE` command (no MLflow stage run is created for a stage that produced nothing);
2. people rank in the labeling page; rerunning the same pipeline finds the answers and finishes the stage once
   `min_answered` of the items have an answer. The digest of the resulting rankings enters the cache key (as the
   param `collect.answers_digest`), so later answers make a later run collect again. Likewise a judge's own
   content (a reward model's files, a user module's source) enters as `collect.judge_digest`.

MLflow (docs/lineage.md): the stage run carries `rlhf.upstream.policy.{run_id,model_uri}`, `rlhf.upstream.
validate.run_id`, the prompts as a dataset input (`rlhf.data.prompts_train.digest`), the collected rankings as
dataset inputs with context `collected` (`rlhf.data.preference_{train,eval}.digest`, the same digests the reward
model's run then logs as its training/evaluation inputs), `collect/*` counts, and the task file and answers as
artifacts under `collection/`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf_core.collection import (
    CollectConfig,
    Collected,
    JudgeLabeler,
    create_task_file,
    default_answers_dir,
    label_with_judge,
    rankings_from_answers,
    read_answers,
    read_task_file,
    split_by_item,
)
from rlhf_core.judges import resolve_judge
from schemas import content_digest, load_rows
from schemas.errors import code_block
from tasks import caching, tracking
from tasks.base_model import directory_digest
from tasks.lengths import measured, resolve_stage_lengths, sampling_lengths
from tasks.pointers import DataRef, StagePointer
from tasks.runner import StageEnv, StageOutcome, StageRun, read_rows, run_stage, stage_task
from tasks.validate import store_rows

STAGE = "collect"
TASK_FILE = "tasks.jsonl"
PROMPTS = "prompts_train"
OUTPUTS = ("preference_train", "preference_eval")
# The settings that decide the candidates (not how they are labeled): they name the collection directory.
GENERATION_FIELDS = ("num_responses", "num_prompts", "sampling", "batch_size", "max_prompt_len", "seed")


class LabelsPending(RuntimeError):
    """Human labeling has not reached `min_answered` yet; the message says what to run."""

    def __init__(self, message: str, task_file: Path, answers_dir: Path) -> None:
        super().__init__(message)
        self.task_file, self.answers_dir = task_file, answers_dir


def collection_dir(env: StageEnv, settings: CollectConfig, policy: StagePointer, prompts: DataRef) -> Path:
    """`<work_dir>/collect/<key[:16]>`, keyed by policy, prompts and the generation settings only."""
    generation = {name: getattr(settings, name) for name in GENERATION_FIELDS}
    key = caching.cache_key("collect-candidates", generation, {PROMPTS: prompts.digest}, {"policy": policy}, "")
    return env.config.work_path() / "collect" / key[:16]


def ensure_task_file(directory: Path, settings: CollectConfig, policy: StagePointer, prompts: DataRef) -> Path:
    """Sample the candidates into `directory/tasks.jsonl` unless they are there already (under a lock, so two
    pipelines sample once). Sampling is seeded, so a rewritten file would be identical anyway."""
    task_file = directory / TASK_FILE
    with caching.file_lock(directory / ".lock"):
        if not task_file.is_file():
            create_task_file(
                policy.model_dir,
                read_rows(prompts),
                settings,
                task_file,
                model_name=policy.model_uri or policy.model_dir,
            )
    return task_file


def label_command(task_file: Path) -> str:
    """The command that serves the labeling page for `task_file`."""
    return f"rlhf label {task_file}"


def _pending_message(task_file: Path, answers_dir: Path, collected: Collected, needed: float) -> str:
    answered, total = int(collected.counts["collect/answered_items"]), int(collected.counts["collect/items"])
    return (
        f"collect: waiting for human rankings: {answered} of {total} items answered, {needed:.0%} needed.\n"
        f"  1. rank them in the labeling page (each person with their own name):\n"
        f"       {label_command(task_file)} --labeler YOUR_NAME\n"
        f"     (same as: python -m flows.labeling_app {task_file} --labeler YOUR_NAME), then open the printed URL;\n"
        f"  2. rerun this pipeline: the collect stage reads the answers in {answers_dir}/ and goes on."
    )


def _attach_instructions(message: str) -> None:
    """Show the instructions on the Prefect flow run too, when there is one."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
        create_markdown_artifact(
            markdown=code_block(message),
            key="labels-pending",
            description="Preference collection waits for human rankings",
        )


def _judge_digest(settings: CollectConfig) -> str:
    """What the judge's verdicts depend on beyond the code version: the RM's files, or a user module's source."""
    if settings.judge == "reward_model":
        return directory_digest(Path(settings.reward_model_path or ""))
    if ":" in settings.judge:
        return caching.module_source_digest(settings.judge)
    return settings.judge


def _store(env: StageEnv, settings: CollectConfig, collected: Collected, source: str) -> dict[str, DataRef]:
    """Split by prompt, store content-addressed, and validate each part with the ranking schema."""
    if not collected.rows:
        raise ValueError(
            f"collect: no ranking rows (counts: {collected.counts}); every item was skipped, "
            "marked all bad, or had fewer than 2 distinct responses"
        )
    parts = split_by_item(collected, settings.eval_fraction, settings.seed)
    refs = {}
    for name, rows in zip(OUTPUTS, parts, strict=True):
        if rows:
            ref = store_rows(env.config.work_path(), name, "ranking", rows, source)
            load_rows(ref.path, "ranking")  # raises DataValidationError: the RM never sees an invalid row
            refs[name] = ref
    return refs


@stage_task("collect")
def collect_task(
    env: StageEnv, validated: StagePointer, policy: StagePointer, settings: CollectConfig | None = None
) -> StagePointer:
    """Collect rankings of `policy`'s responses to the validated `prompts_train` (settings: `settings`, else
    the pipeline config's `collect` section). Returns a pointer whose `datasets` hold `preference_train` (and
    `preference_eval`) ranking data for the reward model; raises `LabelsPending` in step 1 of a human run."""
    settings = settings if settings is not None else getattr(env.config, "collect", None)
    if settings is None:
        raise ValueError("collect: no settings given and the pipeline config has no `collect` section")
    prompts = validated.datasets[PROMPTS]
    settings = resolve_stage_lengths(
        settings, env.config.lengths, STAGE, measured(validated, (PROMPTS,), "prompt"), sampling_lengths(validated)
    )
    directory = collection_dir(env, settings, policy, prompts)
    task_file, answers_dir = directory / TASK_FILE, default_answers_dir(directory / TASK_FILE)
    # What the result depends on beyond the settings, prompts, policy and code enters the key as extra params.
    stage_config: dict[str, Any] = asdict(settings)
    human = None
    if settings.labeler == "human":
        ensure_task_file(directory, settings, policy, prompts)
        human = rankings_from_answers(read_task_file(task_file), read_answers(answers_dir))
        needed = settings.min_answered * human.counts["collect/items"]
        if human.counts["collect/answered_items"] < needed or not human.rows:
            message = _pending_message(task_file, answers_dir, human, settings.min_answered)
            _attach_instructions(message)
            raise LabelsPending(message, task_file, answers_dir)
        stage_config["answers_digest"] = content_digest(human.rows)
    else:
        stage_config["judge_digest"] = _judge_digest(settings)

    def execute(run: StageRun) -> StageOutcome:
        if human is not None:  # exactly the answers whose digest is in the cache key
            collected, labels_dir = human, answers_dir
        else:
            ensure_task_file(directory, settings, policy, prompts)
            judge = JudgeLabeler(
                resolve_judge(settings.judge, settings.reward_model_path), settings.noise, settings.seed
            )
            # The judge's answers stay with this run: the shared directory is for people's answers only.
            labels_dir = run.output_dir / "answers"
            collected = label_with_judge(read_task_file(task_file), judge, labels_dir)
        refs = _store(env, settings, collected, str(task_file))
        for name, ref in refs.items():
            tracking.log_dataset(
                run.client, run.run_id, name, read_rows(ref), ref.source, ref.digest, context="collected"
            )
        run.client.log_artifact(run.run_id, str(task_file), "collection")
        if labels_dir.is_dir():
            run.client.log_artifacts(run.run_id, str(labels_dir), "collection/answers")
        run.logger.log_metrics(collected.counts, step=0)
        return StageOutcome(
            metrics=collected.counts,
            datasets=refs,
            extra={"task_file": str(task_file), "answers_dir": str(answers_dir)},
        )

    extra_tags: dict[str, Any] = {"rlhf.collect.labeler": settings.labeler, "rlhf.collect.task_file": str(task_file)}
    if settings.labeler == "judge":
        extra_tags["rlhf.collect.judge"] = settings.judge
    return run_stage(
        env,
        STAGE,
        stage_config=stage_config,
        data={PROMPTS: prompts},
        upstream={"policy": policy},
        lineage={"validate": validated},
        extra_tags=extra_tags,
        execute=execute,
    )
