"""The labeling page under load: many labelers at once lose no acknowledged answer and keep no refused one.

16 client threads (8 labelers, each in two tabs) post answers to a real server on loopback for `LOAD_SECONDS`,
mixing in refused answers (a partial order) and skips. Then every answer the server acknowledged is on disk
exactly once (as a multiset per labeler), no line is torn, nothing refused was written, and the counts the
pipeline reads (`rankings_from_answers`) and the page shows (`/api/state`) agree with what was acknowledged.

Raise `LOAD_SECONDS` (environment `RLHF_LABELING_LOAD_S`) for a longer soak; the default keeps the test short.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.labeling_app import LabelingServer, make_server
from rlhf_core.collection import (
    item_id,
    rankings_from_answers,
    read_answers,
    read_answers_file,
    write_jsonl_atomic,
)

LOAD_SECONDS = float(os.environ.get("RLHF_LABELING_LOAD_S", "8"))
LABELERS = [f"labeler{n}" for n in range(8)]
TABS = 2  # threads per labeler: 16 in all
NUM_ITEMS = 40
PERMUTATIONS = list(itertools.permutations(["r0", "r1", "r2", "r3"]))

pytestmark = pytest.mark.slow


def _items() -> list[dict]:
    items = []
    for i in range(NUM_ITEMS):
        texts = [f"reply {c} to question {i}" for c in "ABCD"]
        items.append(
            {
                "item_id": item_id(i, f"question {i}", texts),
                "prompt": f"question {i}",
                "responses": [{"id": f"r{r}", "text": t} for r, t in enumerate(texts)],
            }
        )
    return items


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LabelingServer]:
    srv = make_server(write_jsonl_atomic(_items(), tmp_path / "tasks.jsonl"), tmp_path / "answers", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _post(url: str, payload: dict) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status if json.loads(response.read()).get("saved") else -1
    except urllib.error.HTTPError as exc:
        return exc.code


def _key(answer: dict) -> tuple:
    return (answer["item_id"], answer["action"], tuple(answer.get("order") or ()))


def _tab(
    server: LabelingServer, labeler: str, tab: int, deadline: float, acked: list, refused: list, errors: list
) -> None:
    """One browser tab: answers items in turn (every 7th a skip, every 5th a refused partial order)."""
    url = server.url + "api/answer"
    for n in itertools.count():
        if time.monotonic() >= deadline:
            return
        item = server.items[(n * TABS + tab) % NUM_ITEMS]["item_id"]
        if n % 5 == 4:
            payload = {"labeler": labeler, "item_id": item, "order": ["r0", "r1"]}
        elif n % 7 == 6:
            payload = {"labeler": labeler, "item_id": item, "action": "skip"}
        else:
            payload = {
                "labeler": labeler,
                "item_id": item,
                "order": list(PERMUTATIONS[n % len(PERMUTATIONS)]),
            }
        try:
            status = _post(url, payload)
        except OSError as exc:  # a reset or refused connection: not acknowledged, and reported below
            errors.append((payload, repr(exc)))
            continue
        if status == 200:
            acked.append({"action": "rank", **payload})
        elif status == 400 and payload.get("order") == ["r0", "r1"]:
            refused.append(payload)
        else:
            errors.append((payload, status))


def test_many_labelers_at_once_lose_nothing_acknowledged_and_keep_nothing_refused(server) -> None:
    """Given 16 tabs of 8 labelers posting as fast as the server answers for LOAD_SECONDS, then each
    labeler's file holds exactly the answers acknowledged to them (each once, no torn line, no refused one), and
    the answered counts of the page and of the merge match the acknowledged items."""
    deadline = time.monotonic() + LOAD_SECONDS
    acked: dict[str, list] = {name: [] for name in LABELERS}
    refused: list = []
    errors: list = []
    threads = [
        threading.Thread(target=_tab, args=(server, name, tab, deadline, acked[name], refused, errors))
        for name in LABELERS
        for tab in range(TABS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=LOAD_SECONDS + 60)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert errors == []
    total = sum(len(a) for a in acked.values())
    assert total >= len(LABELERS) * TABS and refused, (total, len(refused))

    for name in LABELERS:
        path = server.answers_dir / f"{name}.jsonl"
        on_disk = read_answers_file(path)
        assert len(path.read_text(encoding="utf-8").splitlines()) == len(on_disk), f"{name}: a torn line"
        assert Counter(_key(a) for a in on_disk) == Counter(_key(a) for a in acked[name]), name
        with urllib.request.urlopen(f"{server.url}api/state?labeler={name}", timeout=30) as response:
            state = json.loads(response.read())
        assert state["answered"] == len({a["item_id"] for a in acked[name]}), name

    counts = rankings_from_answers(server.items, read_answers(server.answers_dir)).counts
    latest = {(name, a["item_id"]): a for name in LABELERS for a in acked[name]}
    assert counts["collect/answered_items"] == len({item for _, item in latest})
    assert counts["collect/rankings"] == sum(a["action"] == "rank" for a in latest.values())
    assert counts["collect/skipped"] == sum(a["action"] == "skip" for a in latest.values())
