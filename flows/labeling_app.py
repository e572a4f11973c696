"""The human labeler: a small local web page to rank the K responses of each prompt of a task file.

    python -m flows.labeling_app runs/collect/<key>/tasks.jsonl --port 8765      (or: rlhf label TASKFILE)
    → open http://127.0.0.1:8765/?labeler=alice

One self-contained HTML page (inline CSS and JS, nothing fetched from elsewhere) shows a prompt and its K
responses. The person orders them best → worst by dragging a card, or with the keyboard (Tab to a card, ↑/↓ to
move it, Enter to submit), or skips (S) or marks all as bad (B). Progress is "n of N answered".

Durability: every answer is appended to `<answers_dir>/<labeler>.jsonl` and fsync'd before the page hears
"saved" (`rlhf_core.collection.append_answer`). Nothing is kept only in memory: kill the browser or the server
at any moment and, once restarted, the page resumes at the labeler's first unanswered item. A submission the
server did not acknowledge is reported on the page as NOT saved. Each labeler has their own file and appends
hold an exclusive lock, so several labelers (or tabs, or servers) on one task file never overwrite each other.

Bad or partial submissions (not a permutation of the item's K response ids, an unknown item id, a missing or
malformed labeler name, an unknown action, a missing, negative or non-numeric Content-Length) get HTTP 400 with
a message the page shows; a body over 1 MiB gets 413, one slower than `REQUEST_TIMEOUT_S` 408. Every request gets
an HTTP answer: anything unexpected is a JSON 500 (the traceback goes to the server's stderr) and the server
goes on. The server binds 127.0.0.1 by default (`::1` or `[::1]`: IPv6 loopback) and, bound to loopback, answers
only requests addressed to a loopback host name (a web page elsewhere cannot reach it through DNS rebinding);
POSTs must be JSON (a cross-site form cannot send that). It has no authentication: bind another address only on
a network you trust.

Merge the answers with `collect_rankings(task_file, answers_dir)` (re-exported here from
`rlhf_core.collection`): skips give no row, "all bad" gives no pairs.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from rlhf_core.collection import (
    InvalidAnswer,
    answers_path,
    append_answer,
    check_labeler,
    collect_rankings,
    default_answers_dir,
    latest_answers,
    read_answers_file,
    read_task_file,
    validate_answer,
)

__all__ = ["LabelingServer", "collect_rankings", "main", "make_server", "serve", "serve_server"]

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765
MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 30.0
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


class LabelingServer(ThreadingHTTPServer):
    """An HTTP server over one task file and one answers directory; IPv6 when the host has a `:`."""

    daemon_threads = True
    # listen() backlog: the default 5 overflows when a dozen labelers submit at once (connections reset).
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], task_file: str | Path, answers_dir: str | Path | None = None):
        self.task_file = Path(task_file)
        self.items = read_task_file(self.task_file)
        self.items_by_id = {item["item_id"]: item for item in self.items}
        self.answers_dir = Path(answers_dir) if answers_dir is not None else default_answers_dir(self.task_file)
        host = address[0].removeprefix("[").removesuffix("]")
        # Read by `TCPServer.__init__` when it makes the socket.
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.loopback_only = host in LOOPBACK_NAMES
        super().__init__((host, address[1]), LabelingHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def state(self, labeler: str) -> dict[str, Any]:
        """Progress of `labeler` and their first unanswered item (responses in their display order)."""
        answered = {
            item_id
            for (lab, item_id) in latest_answers(self._answers_of(labeler))
            if lab == labeler and item_id in self.items_by_id
        }
        pending = next((i for i, item in enumerate(self.items) if item["item_id"] not in answered), None)
        state: dict[str, Any] = {
            "labeler": labeler,
            "task": self.task_file.name,
            "total": len(self.items),
            "answered": len(answered),
            "done": pending is None,
            "item": None,
        }
        if pending is not None:
            item = self.items[pending]
            state["item"] = {
                "item_id": item["item_id"],
                "index": pending,
                "prompt": item["prompt"],
                "responses": display_order(item, labeler),
            }
        return state

    def _answers_of(self, labeler: str) -> list[dict[str, Any]]:
        return read_answers_file(answers_path(self.answers_dir, labeler))

    def submit(self, payload: Any) -> dict[str, Any]:
        """Validate, save durably, return the labeler's next state; raises `InvalidAnswer`."""
        answer = validate_answer(self.items_by_id, payload)
        append_answer(self.answers_dir, answer)
        return self.state(answer["labeler"])


def display_order(item: Mapping[str, Any], labeler: str) -> list[dict[str, Any]]:
    """The item's responses shuffled per (item, labeler): sampling order says nothing, and a fixed position
    for the first sample would invite position bias. Deterministic, so a resumed page shows the same order."""
    responses = [
        {"id": r["id"], "text": r["text"], "ended_with_eos": r.get("ended_with_eos", True)} for r in item["responses"]
    ]
    random.Random(f"{item['item_id']}:{labeler}").shuffle(responses)
    return responses


class LabelingHandler(BaseHTTPRequestHandler):
    """`GET /` the page, `GET /api/state?labeler=`, `POST /api/answer`, `GET /healthz`.

    Each request gets exactly one answer: `_respond` turns any exception into a JSON 500.
    """

    server: LabelingServer
    server_version = "rlhf-label/1"
    timeout = REQUEST_TIMEOUT_S  # socket timeout: a client that stops sending mid-request cannot hold a thread

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        sys.stderr.write(f"[label] {self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.answered = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src data:",
        )
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        # ASCII escapes: a lone surrogate in a task file or a message cannot make the encoding fail.
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_allowed(self) -> bool:
        if not self.server.loopback_only:
            return True
        try:
            return urlsplit("//" + (self.headers.get("Host") or "")).hostname in LOOPBACK_NAMES
        except ValueError:  # e.g. "[::1" (an unclosed IPv6 bracket)
            return False

    def _respond(self, handle: Callable[[], None]) -> None:
        """Run `handle`; if it raises before answering, answer a JSON 500 and log the traceback."""
        self.answered = False
        try:
            handle()
        except Exception as exc:  # noqa: BLE001 - every request gets an HTTP answer, the server goes on
            self.log_message("error: %s", traceback.format_exc())
            if self.answered:
                return
            message = f"internal error ({type(exc).__name__}; details in the server's log)"
            if self.command == "POST":  # the page shows it as "Not saved: …"; resubmitting is harmless
                message += ": this answer may NOT have been saved, submit it again"
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, message)
            except OSError:
                pass  # the client is gone

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._respond(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._respond(self._post)

    def _get(self) -> None:
        if not self._host_allowed():
            return self._error(
                HTTPStatus.FORBIDDEN, "this server only answers requests for 127.0.0.1, ::1 or localhost"
            )
        url = urlsplit(self.path)
        if url.path == "/":
            return self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        if url.path == "/healthz":
            return self._json(HTTPStatus.OK, {"ok": True, "items": len(self.server.items)})
        if url.path == "/api/state":
            try:
                labeler = check_labeler(parse_qs(url.query).get("labeler", [""])[0])
            except InvalidAnswer as exc:
                return self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return self._json(HTTPStatus.OK, self.server.state(labeler))
        return self._error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")

    def _post(self) -> None:
        if not self._host_allowed():
            return self._error(
                HTTPStatus.FORBIDDEN, "this server only answers requests for 127.0.0.1, ::1 or localhost"
            )
        if urlsplit(self.path).path != "/api/answer":
            return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the answer as application/json")
        length = (self.headers.get("Content-Length") or "").strip()
        if not length.isdigit() or not length.isascii():
            return self._error(HTTPStatus.BAD_REQUEST, "send a Content-Length of 0 or more bytes")
        if int(length) > MAX_BODY_BYTES:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "answer too large")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            return self._error(HTTPStatus.REQUEST_TIMEOUT, f"request timed out after {self.timeout:g} s")
        try:
            payload = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error(HTTPStatus.BAD_REQUEST, "the answer is not valid JSON")
        try:
            state = self.server.submit(payload)
        except InvalidAnswer as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except OSError as exc:  # disk full, permissions: the page must say the answer is NOT saved
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not save the answer: {exc}")
        return self._json(HTTPStatus.OK, {"saved": True, **state})


def make_server(
    task_file: str | Path, answers_dir: str | Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> LabelingServer:
    """A bound (not yet serving) server; `port=0` picks a free port (see `server.url`)."""
    return LabelingServer((host, port), task_file, answers_dir)


def serve(
    task_file: str | Path,
    answers_dir: str | Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    labeler: str | None = None,
) -> None:
    """Serve the labeling page until interrupted (Ctrl-C), printing where to open it. A malformed task file
    raises `ValueError` (naming its line), an address that cannot be bound `OSError`, before anything is served."""
    serve_server(make_server(task_file, answers_dir, host, port), labeler)


def serve_server(server: LabelingServer, labeler: str | None = None) -> None:
    """Serve a bound server (`make_server`) until interrupted, then close it."""
    if not server.loopback_only:
        print(
            f"WARNING: serving on {server.server_address[0]}, reachable from other machines, with no authentication.",
            file=sys.stderr,
        )
    query = f"?labeler={labeler}" if labeler else "?labeler=YOUR_NAME"
    print(
        f"Labeling {len(server.items)} items of {server.task_file}\n"
        f"answers: {server.answers_dir}/<labeler>.jsonl\n"
        f"open {server.url}{query}   (Ctrl-C to stop; answers are saved as you go)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m flows.labeling_app TASK_FILE [--answers-dir DIR] [--host H] [--port P] [--labeler NAME]`."""
    parser = argparse.ArgumentParser(prog="python -m flows.labeling_app", description=__doc__.splitlines()[0])
    parser.add_argument("task_file", type=Path)
    parser.add_argument(
        "--answers-dir",
        type=Path,
        default=None,
        help="where <labeler>.jsonl files go (default: <task stem>.answers/ beside the task file)",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="bind address (default 127.0.0.1: this machine only; ::1 for IPv6)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--labeler", default=None, help="name to put in the printed URL")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.task_file, args.answers_dir, args.host, args.port)
    except (ValueError, OSError) as exc:  # a malformed task file, a port in use: one line, no traceback
        parser.exit(2, f"error: {exc}\n")
    serve_server(server, args.labeler)


# The page. Text from the task file is only ever inserted with textContent (never as HTML).
PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>RLHF labeling</title>
<style>
  :root { --fg: #1d2433; --muted: #5b6478; --line: #d8dde8; --accent: #2f6fde; --bad: #b3261e; --ok: #1e7d3a; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
         background: #f4f6fa; }
  header { display: flex; gap: 1rem; align-items: center; padding: .7rem 1.2rem; background: #fff;
           border-bottom: 1px solid var(--line); position: sticky; top: 0; z-index: 2; }
  header h1 { font-size: 1.05rem; margin: 0; }
  #who { color: var(--muted); }
  #progress-wrap { margin-left: auto; display: flex; align-items: center; gap: .6rem; }
  progress { width: 11rem; height: .6rem; }
  main { max-width: 60rem; margin: 0 auto; padding: 1rem 1.2rem 3rem; }
  .box { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: .8rem 1rem; }
  .label { font-size: .75rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
           margin: 1rem 0 .35rem; }
  #prompt .turn { white-space: pre-wrap; margin: .2rem 0; }
  #prompt .role { font-weight: 600; margin-right: .4rem; }
  #help { color: var(--muted); font-size: .88rem; margin: .3rem 0 .6rem; }
  kbd { border: 1px solid var(--line); border-bottom-width: 2px; border-radius: 4px; padding: 0 .3rem;
        background: #fff; font-size: .82rem; }
  ol#responses { list-style: none; padding: 0; margin: 0; display: grid; gap: .55rem; }
  li.card { display: grid; grid-template-columns: 2.2rem 1fr; gap: .7rem; align-items: start; background: #fff;
            border: 1px solid var(--line); border-radius: 10px; padding: .7rem .9rem; cursor: grab;
            user-select: none; touch-action: none; }
  li.card:focus { outline: 3px solid var(--accent); outline-offset: 1px; }
  li.card.dragging { cursor: grabbing; box-shadow: 0 6px 18px rgba(0,0,0,.18); border-color: var(--accent); }
  .rank { font-weight: 700; font-size: 1.15rem; text-align: center; color: var(--accent); }
  .rank small { display: block; font-size: .62rem; font-weight: 500; color: var(--muted); }
  .text { white-space: pre-wrap; overflow-wrap: anywhere; }
  .cut { display: inline-block; margin-top: .3rem; font-size: .72rem; color: var(--bad);
         border: 1px solid var(--bad); border-radius: 4px; padding: 0 .3rem; }
  .actions { display: flex; gap: .6rem; margin-top: 1rem; flex-wrap: wrap; }
  button { font: inherit; border-radius: 8px; border: 1px solid var(--line); padding: .5rem 1rem; background: #fff;
           cursor: pointer; }
  button.primary { background: var(--accent); border-color: var(--accent); color: #fff; font-weight: 600; }
  button:disabled { opacity: .5; cursor: wait; }
  #error { display: none; margin-top: 1rem; padding: .7rem 1rem; border-radius: 8px; background: #fdecea;
           color: var(--bad); border: 1px solid #f5c2bd; white-space: pre-wrap; }
  #status { margin-left: .5rem; color: var(--ok); align-self: center; }
  #done, #name-form { display: none; }
  #item-id { color: var(--muted); font-size: .8rem; font-family: ui-monospace, monospace; text-transform: none;
             letter-spacing: 0; margin-left: .4rem; }
</style>
</head>
<body>
<header>
  <h1>Rank the responses</h1>
  <span id="who"></span>
  <div id="progress-wrap"><progress id="bar" max="1" value="0"></progress><span id="progress"></span></div>
</header>
<main>
  <form id="name-form" class="box">
    <p>Who is labeling? Your name keeps your answers apart from other labelers'.</p>
    <input id="name" name="labeler" required pattern="[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}" placeholder="your name">
    <button class="primary" type="submit">Start</button>
  </form>
  <section id="task" hidden>
    <div class="label">Prompt <span id="item-id"></span></div>
    <div id="prompt" class="box"></div>
    <div class="label">Responses — best at the top</div>
    <div id="help">Drag a response to reorder, or <kbd>Tab</kbd> to it and move it with <kbd>↑</kbd>
      <kbd>↓</kbd>. <kbd>Enter</kbd> submit · <kbd>S</kbd> skip · <kbd>B</kbd> all bad.</div>
    <ol id="responses"></ol>
    <div class="actions">
      <button id="submit" class="primary" type="button">Submit ranking ⏎</button>
      <button id="skip" type="button">Skip (S)</button>
      <button id="allbad" type="button">All bad (B)</button>
      <span id="status" role="status"></span>
    </div>
  </section>
  <div id="error" role="alert"></div>
  <section id="done" class="box"><h2>All done</h2><p id="done-text"></p></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const labeler = new URLSearchParams(location.search).get("labeler");
const list = $("responses");
let current = null, shown = [], busy = false, dragging = null;

function showError(message) { $("error").textContent = message; $("error").style.display = message ? "block" : "none"; }
function flash(message) { $("status").textContent = message; setTimeout(() => { $("status").textContent = ""; }, 1500); }
function order() { return [...list.children].map((li) => li.dataset.id); }

function renumber() {
  const cards = [...list.children];
  cards.forEach((li, i) => {
    const rank = li.querySelector(".rank");
    rank.textContent = String(i + 1);
    const tag = document.createElement("small");
    tag.textContent = i === 0 ? "best" : i === cards.length - 1 ? "worst" : "";
    rank.appendChild(tag);
    li.setAttribute("aria-label", `rank ${i + 1} of ${cards.length}`);
  });
}

function renderPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  const turns = typeof prompt === "string" ? [{ role: "", content: prompt }] : prompt;
  for (const turn of turns) {
    const div = document.createElement("div");
    div.className = "turn";
    if (turn.role) {
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = turn.role + ":";
      div.appendChild(role);
    }
    div.appendChild(document.createTextNode(turn.content));
    box.appendChild(div);
  }
}

function card(response) {
  const li = document.createElement("li");
  li.className = "card";
  li.tabIndex = 0;
  li.dataset.id = response.id;
  const rank = document.createElement("div");
  rank.className = "rank";
  const body = document.createElement("div");
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = response.text || "(empty response)";
  body.appendChild(text);
  if (!response.ended_with_eos) {
    const cut = document.createElement("span");
    cut.className = "cut";
    cut.textContent = "cut off: reached the length limit";
    body.appendChild(cut);
  }
  li.append(rank, body);
  li.addEventListener("keydown", onCardKey);
  li.addEventListener("pointerdown", onPointerDown);
  li.addEventListener("pointermove", onPointerMove);
  li.addEventListener("pointerup", onPointerUp);
  li.addEventListener("pointercancel", onPointerUp);
  return li;
}

function render(state) {
  $("who").textContent = "labeler: " + state.labeler;
  $("progress").textContent = `${state.answered} of ${state.total} answered`;
  $("bar").max = state.total;
  $("bar").value = state.answered;
  if (state.done) {
    current = null;
    $("task").hidden = true;
    $("done").style.display = "block";
    $("done-text").textContent = `You answered all ${state.total} items of ${state.task}. Thank you!`;
    return;
  }
  current = state.item;
  $("task").hidden = false;
  $("done").style.display = "none";
  $("item-id").textContent = `item ${current.index + 1} · ${current.item_id}`;
  renderPrompt(current.prompt);
  list.replaceChildren(...current.responses.map(card));
  shown = order();
  renumber();
  list.firstElementChild.focus();
}

async function load() {
  try {
    const resp = await fetch("/api/state?labeler=" + encodeURIComponent(labeler));
    const data = await resp.json();
    if (!resp.ok) { showError(data.error); return; }
    showError("");
    render(data);
  } catch (e) {
    showError("Cannot reach the labeling server. Start it again (rlhf label TASKFILE) and reload this page.");
  }
}

async function submit(action) {
  if (!current || busy) return;
  busy = true;
  for (const id of ["submit", "skip", "allbad"]) $(id).disabled = true;
  const body = { labeler, item_id: current.item_id, action, shown };
  if (action === "rank") body.order = order();
  try {
    const resp = await fetch("/api/answer", { method: "POST", headers: { "Content-Type": "application/json" },
                                              body: JSON.stringify(body) });
    const data = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
    if (!resp.ok) { showError("Not saved: " + data.error); return; }
    showError("");
    flash(action === "rank" ? "Saved ✓" : action === "skip" ? "Skipped ✓" : "Marked all bad ✓");
    render(data);
  } catch (e) {
    showError("Could not reach the labeling server: this answer was NOT saved. Restart the server and submit " +
              "again (your earlier answers are safe on disk).");
  } finally {
    busy = false;
    for (const id of ["submit", "skip", "allbad"]) $(id).disabled = false;
  }
}

function move(li, delta) {
  if (delta < 0 && li.previousElementSibling) list.insertBefore(li, li.previousElementSibling);
  if (delta > 0 && li.nextElementSibling) list.insertBefore(li.nextElementSibling, li);
  renumber();
  li.focus();
}

function onCardKey(event) {
  if (event.key === "ArrowUp" || event.key === "ArrowDown") {
    event.preventDefault();
    event.stopPropagation();
    move(event.currentTarget, event.key === "ArrowUp" ? -1 : 1);
  }
}

function onPointerDown(event) {
  if (event.button !== 0) return;
  dragging = event.currentTarget;
  dragging.setPointerCapture(event.pointerId);
  dragging.classList.add("dragging");
  event.preventDefault();
}

function onPointerMove(event) {
  if (dragging !== event.currentTarget) return;
  let before = null;
  for (const other of list.children) {
    if (other === dragging) continue;
    const box = other.getBoundingClientRect();
    if (event.clientY < box.top + box.height / 2) { before = other; break; }
  }
  if (before !== dragging.nextElementSibling) { list.insertBefore(dragging, before); renumber(); }
}

function onPointerUp(event) {
  if (dragging !== event.currentTarget) return;
  dragging.classList.remove("dragging");
  dragging.focus();
  dragging = null;
}

document.addEventListener("keydown", (event) => {
  if (!current || event.target.tagName === "BUTTON" || event.target.tagName === "INPUT") return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "Enter") { event.preventDefault(); submit("rank"); }
  else if (event.key === "s" || event.key === "S") submit("skip");
  else if (event.key === "b" || event.key === "B") submit("all_bad");
});
$("submit").addEventListener("click", () => submit("rank"));
$("skip").addEventListener("click", () => submit("skip"));
$("allbad").addEventListener("click", () => submit("all_bad"));

if (labeler) {
  load();
} else {
  $("name-form").style.display = "block";
  $("who").textContent = "no labeler name yet";
  showError("Enter your name to start (it becomes ?labeler=NAME in the address).");
}
</script>
</body>
</html>
"""


if __name__ == "__main__":
    main()
