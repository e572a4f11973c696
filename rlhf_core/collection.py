"""Preference collection: the data loop in front of the reward model.

    prompts ─► sample K responses ─► task file ─► labeler (judge or human) ─► answers ─► ranking rows ─► RM

For each prompt a model (the SFT model by default) samples K responses with recorded sampling settings. The
responses go to a **task file**; a **labeler** orders them best → worst, each order is one **answer**, and
`rankings_from_answers` turns the answers into canonical ranking rows `{"prompt", "responses": [best, ...,
worst]}` (expanded to the K(K−1)/2 pairs `(responses[i] ≻ responses[j]), i < j` by `schemas.ranking_to_pairs`
or directly by the reward-model trainer).

Task file (JSON lines, one item per prompt, self-contained so items can be split, merged or shipped):

    {"item_id": "00003-5be1f0c2aa", "prompt": <str or messages>,
     "responses": [{"id": "r0", "text": "...", "ended_with_eos": true}, ...],        K entries, sampling order
     "model": "<path of the model that sampled>", "sampling": {SamplingConfig fields, the batch's seed}}

`item_id` = `<index>-<sha256 of prompt and texts>[:10]`, so an answer can never be applied to a different item
that happens to sit at the same line of a regenerated file.

Answers (JSON lines, appended, one file per labeler `<answers_dir>/<labeler>.jsonl`):

    {"item_id", "labeler", "action": "rank" | "skip" | "all_bad", "order": [ids best → worst] (rank only), ...}

The last answer of a labeler to an item wins (a labeler may correct an answer). `skip` and `all_bad` give no
ranking row: "all bad" says the responses are equally unacceptable, which orders nothing, so it yields no pairs
(it is counted, and kept in the answers file for whoever wants to train on it differently). Each labeler's
answer is its own row, so two labelers agreeing on a prompt count twice (their votes), and disagreeing labelers'
pairs partly cancel in the Bradley–Terry loss.

Identical response texts within one item would make a pair `y ≻ y`; a row keeps only the first (best-ranked)
occurrence of each text, and drops empty or blank responses (an immediate EOS), which the ranking schema
rejects. Such an item gives fewer than K(K−1)/2 pairs, and one with < 2 usable texts no row.

Judge labelers (`JudgeLabeler`) rank by any scoring function `score(prompt, response) -> float`: the bundled
task's gold judge, a trained reward model (`judges.reward_model_scorer`), or a user callable named `"module:function"`
(`judges.import_callable` — this IMPORTS AND RUNS the named module's code, so only name code you trust). Label noise
for simulations: with probability `noise` an answer is a uniformly random order instead of the judge's (a
careless labeler); a random order agrees with the judge on each pair with probability ½, so the expected share
of pairs that disagree with the judge is `noise / 2`. Responses the judge scores equal are not ordered among
themselves (a ranking cannot express a tie): only the first of them is ranked, the others are `tied` and give no
pairs, so an item gives all K(K−1)/2 pairs only when its K scores are distinct. An item whose K responses all score
the same is skipped (`tied` lists them all): a ranking of one response would order nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rlhf_core.atomic import atomic_open
from rlhf_core.generation import SamplingConfig, generate
from rlhf_core.judges import ScoreFn
from rlhf_core.tokenization import (
    Conversation,
    default_device,
    prompt_of,
)

ACTIONS = ("rank", "skip", "all_bad")
LABELER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always `fullmatch`: `$` lets "name\n" pass
ANSWERS_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class CollectConfig:
    """Preference collection (the pipeline's `collect:` section)."""

    model: Literal["sft", "base"] = "sft"
    """Pipeline: which model samples the responses (the SFT model, or the untrained base model)."""
    num_responses: int = 4
    """K: responses sampled per prompt (>= 2); a full ranking of K distinct responses gives K(K−1)/2 pairs."""
    num_prompts: int | None = None
    """Collect on the first N prompts of the prompt set (None: all)."""
    sampling: SamplingConfig = SamplingConfig()
    """How responses are sampled; its `seed` is replaced by `seed + batch index` (recorded per item)."""
    batch_size: int = 8
    """Prompts per generation batch (each prompt repeated K times in the batch)."""
    max_prompt_len: int | Literal["auto"] | None = 256
    """Keep the last this-many prompt tokens when sampling (None: no limit; "auto": cover 95% of the prompts,
    resolved by the pipeline)."""
    labeler: Literal["judge", "human"] = "judge"
    """`judge`: rank with `judge` unattended; `human`: people rank in the labeling page (`rlhf label`)."""
    judge: str | None = None
    """Needed with `labeler: judge`: `reward_model` (a trained RM at `reward_model_path`), `module:function`
    naming `f(prompt, response) -> float` (imports and runs that user code), or `gold`, short for the bundled
    task's judge `rlhf_core.support_bot:gold_score`. No default: no task's judge ranks another task's data."""
    reward_model_path: str | None = None
    """Directory of the reward model used when `judge` is `reward_model`."""
    noise: float = 0.0
    """Judge only: probability that an answer is a uniformly random order (label noise for simulations)."""
    eval_fraction: float = 0.1
    """Share of collected prompts held out as the reward model's eval rankings (split by prompt)."""
    min_answered: float = 1.0
    """Human only: share of items that need an answer from some labeler before the rankings are used."""
    seed: int = 0
    """Seeds the sampling (`seed + batch index`), the label noise and the train/eval split."""

    def __post_init__(self) -> None:
        if self.num_responses < 2:
            raise ValueError(f"num_responses must be >= 2 (a ranking compares), got {self.num_responses}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 or None, got {self.num_prompts}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_len not in (None, "auto") and self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1 or None, got {self.max_prompt_len}")
        if self.model not in ("sft", "base"):
            raise ValueError(f"model must be 'sft' or 'base', got {self.model!r}")
        if self.labeler not in ("judge", "human"):
            raise ValueError(f"labeler must be 'judge' or 'human', got {self.labeler!r}")
        if self.judge is not None and self.judge not in ("gold", "reward_model") and ":" not in self.judge:
            raise ValueError(f"judge must be 'gold', 'reward_model' or 'module:function', got {self.judge!r}")
        if self.judge == "reward_model" and not self.reward_model_path:
            raise ValueError("judge 'reward_model' needs reward_model_path")
        for name in ("noise", "min_answered"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


class InvalidAnswer(ValueError):
    """An answer that is not a valid ordering of one task item (the labeling page shows the message)."""


# --------------------------------------------------------------------------------------------------------------
# Sampling candidates → task file
# --------------------------------------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def item_id(index: int, prompt: Conversation, texts: Sequence[str]) -> str:
    """`<index:05d>-<sha256(prompt, texts)[:10]>`: position for humans, content hash against mix-ups."""
    return f"{index:05d}-{hashlib.sha256(_json([prompt, list(texts)]).encode()).hexdigest()[:10]}"


def sample_candidates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Conversation | Mapping[str, Any]],
    config: CollectConfig,
    model_name: str,
) -> list[dict[str, Any]]:
    """Sample K = `config.num_responses` responses per prompt → task items (see the module docstring).

    Prompts go in batches of `config.batch_size`, each prompt repeated K times (`[batch·K]` sequences); batch b
    samples with seed `config.seed + b`, so the same config gives the same items. `model_name` is recorded.
    """
    prompts = [prompt_of(p) for p in prompts][: config.num_prompts]
    k = config.num_responses
    items: list[dict[str, Any]] = []
    for b, start in enumerate(range(0, len(prompts), config.batch_size)):
        chunk = prompts[start : start + config.batch_size]
        sampling = replace(config.sampling, seed=config.seed + b)
        out = generate(model, tokenizer, [p for p in chunk for _ in range(k)], sampling, config.max_prompt_len)
        for j, prompt in enumerate(chunk):
            texts = out.texts[j * k : (j + 1) * k]
            ended = out.ended_with_eos[j * k : (j + 1) * k].tolist()
            items.append(
                {
                    "item_id": item_id(len(items), prompt, texts),
                    "prompt": prompt,
                    "responses": [
                        {"id": f"r{r}", "text": t, "ended_with_eos": bool(e)}
                        for r, (t, e) in enumerate(zip(texts, ended, strict=True))
                    ],
                    "model": model_name,
                    "sampling": asdict(sampling),
                }
            )
    return items


def write_jsonl_atomic(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines to a temporary file, fsync, rename into place: `path` is complete or absent."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def _check_item(item: Any, where: str) -> None:
    if not isinstance(item, dict) or not {"item_id", "prompt", "responses"} <= item.keys():
        raise ValueError(f"{where}: a task item needs item_id, prompt and responses")
    if not isinstance(item["item_id"], str) or not item["item_id"]:
        raise ValueError(f"{where}: item_id must be a non-empty string")
    responses = item["responses"]
    ids = (
        [
            r["id"]
            for r in responses
            if isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("text"), str)
        ]
        if isinstance(responses, list)
        else []
    )
    if not isinstance(responses, list) or len(ids) != len(responses) or len(set(ids)) != len(ids) or len(ids) < 2:
        raise ValueError(f"{where}: responses must be a list of >= 2 objects with a unique string `id` and a `text`")


def read_task_file(path: str | Path) -> list[dict[str, Any]]:
    """The items of a task file, in file order; raises `ValueError` naming the line of a malformed item."""
    items, seen = [], set()
    with open(path, "rb") as handle:
        for n, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); is it a task file?"
                ) from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
            _check_item(item, f"{path}:{n}")
            if item["item_id"] in seen:
                raise ValueError(f"{path}:{n}: duplicate item_id {item['item_id']!r}")
            seen.add(item["item_id"])
            items.append(item)
    if not items:
        raise ValueError(f"{path}: the task file holds no items")
    return items


def create_task_file(
    model_path: str | Path,
    prompts: Sequence[Conversation | Mapping[str, Any]],
    config: CollectConfig,
    task_file: str | Path,
    device: torch.device | str | None = None,
    model_name: str | None = None,
) -> list[dict[str, Any]]:
    """Load the policy at `model_path`, sample the candidates and write them atomically to `task_file`.

    `model_name` (default: `model_path`) is what the items record as their model (e.g. an MLflow model URI).
    """
    from rlhf_core.inference import load_policy

    model, tokenizer = load_policy(model_path, device=default_device(device))
    items = sample_candidates(model, tokenizer, prompts, config, str(model_name or model_path))
    write_jsonl_atomic(items, task_file)
    return items


# --------------------------------------------------------------------------------------------------------------
# Labelers → answers
# --------------------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JudgeLabeler:
    """Ranks every item by `score_fn`, highest score first (equal scores: see `answer`), with optional noise.

    With probability `noise` an answer is instead a uniformly random order (`"noisy": true` in the answer). The
    draw uses `random.Random(f"{seed}:{item_id}")`, so an item's label does not depend on which other items are
    labeled or in what order.
    """

    def __init__(self, score_fn: ScoreFn, noise: float = 0.0, seed: int = 0, name: str = "judge") -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        if not isinstance(name, str) or not LABELER_NAME.fullmatch(name):
            raise ValueError(f"invalid labeler name {name!r}")
        self.score_fn, self.noise, self.seed, self.name = score_fn, noise, seed, name

    def scores(self, item: Mapping[str, Any]) -> list[float]:
        """One finite score per response of `item`, batched when the scorer offers `score_batch`."""
        texts = [r["text"] for r in item["responses"]]
        batch_fn = getattr(self.score_fn, "score_batch", None)
        raw = batch_fn(item["prompt"], texts) if batch_fn else [self.score_fn(item["prompt"], t) for t in texts]
        scores = [float(s) for s in raw]
        if len(scores) != len(texts) or not all(math.isfinite(s) for s in scores):
            raise ValueError(
                f"item {item['item_id']}: the judge must return one finite score per response, got {scores}"
            )
        return scores

    def answer(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The answer to one item: `order` best → worst, `tied`, plus `scores` by response id and `noisy`.

        A ranking cannot say "equally good", and ordering equal scores by sampling position would invent
        preferences, so of responses with the same score only the first (in sampling order) is ranked; the others
        are listed in `tied` and give no pairs; when all K score the same the answer is a `skip` (nothing to order).
        A noisy answer ranks all K at random.
        """
        ids = [r["id"] for r in item["responses"]]
        scores = self.scores(item)
        rng = random.Random(f"{self.seed}:{item['item_id']}")
        noisy = rng.random() < self.noise
        if noisy:
            order, tied = list(ids), []
            rng.shuffle(order)
        else:
            first_of_score: dict[float, str] = {}
            for i, score in enumerate(scores):
                first_of_score.setdefault(score, ids[i])
            order = [first_of_score[score] for score in sorted(first_of_score, reverse=True)]
            tied = [i for i in ids if i not in order]
        answer = {"item_id": item["item_id"], "labeler": self.name, "action": "rank", "order": order, "tied": tied}
        if len(order) < 2:
            answer = {"item_id": item["item_id"], "labeler": self.name, "action": "skip", "tied": ids}
        return {**answer, "scores": dict(zip(ids, scores, strict=True)), "noisy": noisy, "time": _now()}

    def label(self, items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Answers to every item, in order."""
        return [self.answer(item) for item in items]


def check_labeler(name: Any) -> str:
    """`name` if it is a valid labeler name (it names a file: 1-64 letters, digits, `_.-`), else `InvalidAnswer`."""
    if not name:
        raise InvalidAnswer("missing labeler name: open the page as /?labeler=YOUR_NAME or enter a name")
    if not isinstance(name, str) or not LABELER_NAME.fullmatch(name):
        raise InvalidAnswer(
            f"invalid labeler name {_brief(name)}: use 1-64 letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)"
        )
    return name


def validate_answer(items_by_id: Mapping[str, Mapping[str, Any]], payload: Any) -> dict[str, Any]:
    """Check a submitted answer against the task items; returns the normalised answer or raises `InvalidAnswer`
    with a message meant for the person who submitted it.

    Valid: `labeler` a name of letters, digits, `_.-` (it names the answers file); `item_id` an item of the task
    file; `action` one of rank / skip / all_bad; for `rank`, `order` lists every response id of the item
    exactly once — or, for judges, `order` plus `tied` do (`tied`: responses scored equal to a ranked one, left
    out of the ranking), with at least 2 ranked (fewer orders nothing); skip and all_bad carry no order; `shown`,
    if given, lists the item's response ids in the order the page showed them. Linear in the size of `payload`.
    """
    if not isinstance(payload, dict):
        raise InvalidAnswer("the answer must be a JSON object")
    labeler = check_labeler(payload.get("labeler"))
    item_key = payload.get("item_id")
    if not isinstance(item_key, str) or item_key not in items_by_id:
        raise InvalidAnswer(f"unknown item id {_brief(item_key)}: it is not in this task file")
    action = payload.get("action", "rank")
    if not isinstance(action, str) or action not in ACTIONS:
        raise InvalidAnswer(f"unknown action {_brief(action)}: expected one of {', '.join(ACTIONS)}")
    answer = {"item_id": item_key, "labeler": labeler, "action": action}
    item = items_by_id[item_key]
    order = payload.get("order")
    if action == "rank":
        tied = payload.get("tied") or []
        if not isinstance(tied, list):
            raise InvalidAnswer("tied must be a list of response ids")
        _check_order(item, order + tied if tied and isinstance(order, list) else order)
        if len(order) < 2:
            raise InvalidAnswer("a ranking must order at least 2 responses (all equally good or bad: use all bad)")
        answer["order"] = list(order)
        if tied:
            answer["tied"] = list(tied)
    elif order:
        raise InvalidAnswer(f"action {action!r} takes no order")
    shown = payload.get("shown")
    if shown is not None:
        # The on-screen order before the person moved anything (position-bias studies): the item's ids.
        if not isinstance(shown, list) or not _is_permutation(item, shown):
            raise InvalidAnswer("shown must list the item's response ids in the order the page showed them")
        answer["shown"] = list(shown)
    return answer


def _brief(value: Any, limit: int = 80) -> str:
    """`repr` of a submitted value for an error message, cut to `limit` characters (a client sent it)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_permutation(item: Mapping[str, Any], values: list[Any]) -> bool:
    ids = [r["id"] for r in item["responses"]]
    return len(values) == len(ids) and all(isinstance(v, str) for v in values) and set(values) == set(ids)


def _check_order(item: Mapping[str, Any], order: Any) -> list[str]:
    """`order` if it lists every response id of `item` exactly once, else `InvalidAnswer` naming the missing,
    unknown and duplicated ids. Linear in `len(order)`: a client may send a 1 MiB list."""
    ids = [r["id"] for r in item["responses"]]
    if not isinstance(order, list) or not all(isinstance(o, str) for o in order):
        raise InvalidAnswer(f"order must be a list of the {len(ids)} response ids, best first")
    counts = Counter(order)
    missing = [i for i in ids if i not in counts]
    unknown = sorted(counts.keys() - set(ids))
    duplicated = sorted(o for o, n in counts.items() if n > 1)
    if missing or unknown or duplicated:
        problems = [
            f"{name} {_brief(values)}"
            for name, values in (("missing", missing), ("unknown", unknown), ("duplicated", duplicated))
            if values
        ]
        raise InvalidAnswer(
            f"the order must rank each of the {len(ids)} responses exactly once: " + "; ".join(problems)
        )
    return list(order)


# --------------------------------------------------------------------------------------------------------------
# Answers on disk: append-only, one file per labeler
# --------------------------------------------------------------------------------------------------------------


def default_answers_dir(task_file: str | Path) -> Path:
    """Where the answers to `task_file` go unless told otherwise: `tasks.jsonl` → `tasks.answers/` beside it."""
    path = Path(task_file)
    return path.with_name(f"{path.stem}.answers")


def answers_path(answers_dir: str | Path, labeler: str) -> Path:
    """`<answers_dir>/<labeler>.jsonl` (the name was validated: no path separators)."""
    return Path(answers_dir) / f"{check_labeler(labeler)}{ANSWERS_SUFFIX}"


def append_answer(answers_dir: str | Path, answer: Mapping[str, Any]) -> None:
    """Append one answer to its labeler's file and fsync before returning, under an exclusive `flock`.

    The lock serialises writers on the same file (two tabs, two servers); fsync means an answer acknowledged to
    the browser survives a kill of the server or a power cut. A line torn by a crash mid-write is closed with a
    newline first, so it spoils only itself (and is ignored by `read_answers`).
    """
    path = answers_path(answers_dir, answer["labeler"])
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(answer)
    record.setdefault("time", _now())
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode()
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        _write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    if created:  # make the new directory entry durable too
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written (a write may be cut short, e.g. by a signal or a full disk quota)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"write returned {written}")
        view = view[written:]


def read_answers(answers_dir: str | Path) -> list[dict[str, Any]]:
    """Every answer of every labeler (`*.jsonl` in `answers_dir`, files by name, lines in order). Lines that
    are not complete JSON objects (torn by a crash) are skipped."""
    directory = Path(answers_dir)
    if not directory.is_dir():
        return []
    return [a for path in sorted(directory.glob(f"*{ANSWERS_SUFFIX}")) for a in read_answers_file(path)]


def read_answers_file(path: str | Path) -> list[dict[str, Any]]:
    """The answers in one labeler's file (empty when it does not exist); torn lines are skipped."""
    if not Path(path).is_file():
        return []
    answers = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(answer, dict) and "item_id" in answer and "labeler" in answer:
                answers.append(answer)
    return answers


def latest_answers(answers: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """`{(labeler, item_id): answer}` keeping each labeler's last answer to an item."""
    return {(a["labeler"], a["item_id"]): a for a in answers}


# --------------------------------------------------------------------------------------------------------------
# Answers → ranking rows
# --------------------------------------------------------------------------------------------------------------


def ranking_row(prompt: Conversation, ordered_texts: Sequence[str]) -> dict[str, Any] | None:
    """`{"prompt", "responses": [best, ..., worst]}` keeping the first (best-ranked) copy of each text and
    dropping blank texts (the ranking schema requires non-blank responses); None when fewer than 2 remain."""
    distinct = list(dict.fromkeys(t for t in ordered_texts if t.strip()))
    return {"prompt": prompt, "responses": distinct} if len(distinct) >= 2 else None


@dataclass(frozen=True)
class Collected:
    """Ranking rows and what produced them."""

    rows: list[dict[str, Any]]
    """Canonical ranking rows, in task-file order, then by labeler name."""
    row_items: list[str]
    """`item_id` of each row (for splits by prompt)."""
    counts: dict[str, float]
    """`collect/items`, `/answered_items`, `/rankings`, `/pairs`, `/skipped`, `/all_bad`, `/labelers`,
    `/no_eos_fraction` (share of sampled responses cut by `max_new_tokens`)."""


def rankings_from_answers(items: Sequence[Mapping[str, Any]], answers: Iterable[Mapping[str, Any]]) -> Collected:
    """Each labeler's last valid answer per item → ranking rows (skip / all_bad → no row; see module doc).

    Answers that no longer fit the task file (unknown item, bad order) are ignored, so a hand-edited or stale
    answers file cannot inject rows.
    """
    by_id = {item["item_id"]: item for item in items}
    latest = latest_answers(answers)
    per_item: dict[str, dict[str, Mapping[str, Any]]] = {}
    for (labeler, key), answer in latest.items():
        per_item.setdefault(key, {})[labeler] = answer
    rows, row_items = [], []
    counts = dict.fromkeys(("rank", "skip", "all_bad"), 0)
    answered: set[str] = set()
    for item in items:
        mine = per_item.get(item["item_id"], {})
        for labeler in sorted(mine):
            try:
                answer = validate_answer(by_id, dict(mine[labeler]))
            except InvalidAnswer:
                continue
            answered.add(item["item_id"])
            counts[answer["action"]] += 1
            if answer["action"] != "rank":
                continue
            text = {r["id"]: r["text"] for r in item["responses"]}
            row = ranking_row(item["prompt"], [text[i] for i in answer["order"]])
            if row is not None:
                rows.append(row)
                row_items.append(item["item_id"])
    responses = [r for item in items for r in item["responses"]]
    return Collected(
        rows=rows,
        row_items=row_items,
        counts={
            "collect/items": float(len(items)),
            "collect/answered_items": float(len(answered)),
            "collect/rankings": float(len(rows)),
            "collect/pairs": float(sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in rows)),
            "collect/skipped": float(counts["skip"]),
            "collect/all_bad": float(counts["all_bad"]),
            "collect/labelers": float(len({lab for lab, _ in latest})),
            "collect/no_eos_fraction": sum(not r.get("ended_with_eos", True) for r in responses)
            / max(len(responses), 1),
        },
    )


def collect_rankings(task_file: str | Path, answers_dir: str | Path) -> list[dict[str, Any]]:
    """The ranking rows of every labeler's answers in `answers_dir` to the items of `task_file`."""
    return rankings_from_answers(read_task_file(task_file), read_answers(answers_dir)).rows


def split_by_item(collected: Collected, eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """`(train_rows, eval_rows)` with whole items (all labelers' rows of a prompt) on one side, so no held-out
    prompt was seen in training. `round(eval_fraction · items)` items are held out, drawn with `seed`."""
    keys = list(dict.fromkeys(collected.row_items))
    n_eval = round(eval_fraction * len(keys))
    held_out = set(random.Random(seed).sample(keys, n_eval)) if n_eval else set()
    train = [r for r, k in zip(collected.rows, collected.row_items, strict=True) if k not in held_out]
    held = [r for r, k in zip(collected.rows, collected.row_items, strict=True) if k in held_out]
    return train, held


def label_with_judge(
    items: Sequence[Mapping[str, Any]], labeler: JudgeLabeler, answers_dir: str | Path | None = None
) -> Collected:
    """Answer every item with `labeler` (saved to `answers_dir/<labeler.name>.jsonl` when given, as a human's
    would be) and return the rankings."""
    answers = labeler.label(items)
    if answers_dir is not None:
        path = answers_path(answers_dir, labeler.name)
        # One judge pass is one file: rewrite rather than append, so a rerun does not double its votes.
        write_jsonl_atomic(answers, path)
    return rankings_from_answers(items, answers)
