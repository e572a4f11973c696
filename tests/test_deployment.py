"""End to end as a user, on 127.0.0.1: the quickstart deployment on a local Prefect server, `rlhf run`, `rlhf ui`.

The quickstart deployment is served exactly as docs/deployment.md tells a user, secured as
scripts/serve_local.sh does it: a login (PREFECT_SERVER_API_AUTH_STRING), CSRF protection and CORS limited to
the server's own origin; the CLI and the worker log in with PREFECT_API_AUTH_STRING.

Given a fresh `prefect server start` on a free 127.0.0.1 port (temporary PREFECT_HOME) and the repository's
`prefect.yaml`, when we create the process work pool, `prefect deploy --name quickstart`, start a worker and
`prefect deployment run 'rlhf-pipeline/quickstart'` with a tiny config override, then the flow run reaches
COMPLETED with one task run per stage, and the MLflow parent run it wrote is tagged with that flow run's id.

Every process is started in its own session and torn down in `finally`, pass or fail. Bounded: the whole test
gives up after `DEADLINE_S`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
DEADLINE_S = 240.0
POOL = "rlhf-pool"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Prefect:
    """A running local Prefect server and the environment that points the CLI at it."""

    api_url: str
    env: dict[str, str]
    logs: Path
    auth: str

    def cli(self, *args: str, cwd: Path = REPO, timeout: float = 120) -> str:
        """Run `prefect …` against this server; return stdout, fail the test with the output on error."""
        proc = subprocess.run(
            [PREFECT, "--no-prompt", *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def flow_run(self, flow_run_id: str) -> dict:
        return self._api("GET", f"/flow_runs/{flow_run_id}")

    def task_runs(self, flow_run_id: str) -> list[dict]:
        body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200, "offset": 0}
        return self._api("POST", "/task_runs/filter", body)

    def _api(
        self, method: str, path: str, body: dict | None = None, login: bool = True, csrf: bool = True
    ) -> dict | list:
        headers = {"Content-Type": "application/json"}
        if login:
            headers["Authorization"] = "Basic " + base64.b64encode(self.auth.encode()).decode()
        if csrf and method != "GET":
            token = self._api("GET", "/csrf-token?client=test", login=login)
            headers |= {"Prefect-Csrf-Token": token["token"], "Prefect-Csrf-Client": "test"}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.api_url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def refused(self, method: str, path: str, **kwargs: bool) -> int:
        """The HTTP status of a request the server must refuse (0 if it was accepted)."""
        try:
            self._api(method, path, {} if method != "GET" else None, **kwargs)
        except urllib.error.HTTPError as error:
            return error.code
        return 0


@contextmanager
def background(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> Iterator[subprocess.Popen]:
    """Start `command` in its own process group; on exit SIGTERM the group, then SIGKILL what is left."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    """Poll `predicate` until it returns something truthy (returned), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(root: Path, extra_env: dict[str, str]) -> Iterator[Prefect]:
    """`prefect server start --host 127.0.0.1` on a free port with PREFECT_HOME under `root`."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    auth = "admin:" + secrets.token_urlsafe(16)
    env = {
        **os.environ,
        # `prefect deploy` resolves the pull step's `{{ $PWD }}` from this, as a shell in the repo root would.
        "PWD": str(REPO),
        "PREFECT_HOME": str(root / "prefect_home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",  # the UI is not under test; skipping its static build starts faster
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "PREFECT_API_AUTH_STRING": auth,
        **extra_env,
    }
    server_env = {
        **env,
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}",
    }
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(command, server_env, logs / "server.log") as server:
        wait_until(lambda: _healthy(f"{api_url}/health") or server.poll() is not None, 90, "the Prefect server")
        assert server.poll() is None, (logs / "server.log").read_text()
        yield Prefect(api_url, env, logs, auth)


def trigger(prefect: Prefect, deployment: str, parameters: dict) -> str:
    """`prefect deployment run NAME --params JSON`, returning the new flow run's id."""
    out = prefect.cli("deployment", "run", deployment, "--params", json.dumps(parameters))
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    return match[1]


def wait_for_terminal_state(prefect: Prefect, flow_run_id: str, timeout: float) -> dict:
    def terminal() -> dict | None:
        run = prefect.flow_run(flow_run_id)
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return wait_until(terminal, timeout, f"flow run {flow_run_id} to finish", interval=2.0)


def serve_and_run(
    root: Path, deployment: str, parameters: dict, extra_env: dict[str, str], deadline: float, cwd: Path = REPO
) -> tuple[dict, list[dict], str]:
    """Server → work pool → deploy → worker → trigger → wait; returns (flow run, task runs, worker log)."""
    start = time.monotonic()
    with ExitStack() as stack:
        prefect = stack.enter_context(prefect_server(root, {**extra_env, "PWD": str(cwd)}))
        # Secured: no login → 401; a logged-in write without a CSRF token → 403.
        assert prefect.refused("POST", "/flow_runs/filter", login=False) == 401
        assert prefect.refused("POST", "/flow_runs/filter", csrf=False) == 403
        prefect.cli("work-pool", "create", POOL, "--type", "process", cwd=cwd)
        prefect.cli("deploy", "--name", deployment.split("/", 1)[1], cwd=cwd)
        stack.enter_context(
            background(
                [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
                prefect.env,
                prefect.logs / "worker.log",
                cwd=cwd,
            )
        )
        flow_run_id = trigger(prefect, deployment, parameters)
        run = wait_for_terminal_state(prefect, flow_run_id, deadline - (time.monotonic() - start))
        worker_log = (prefect.logs / "worker.log").read_text(errors="replace")
        return run, prefect.task_runs(flow_run_id), worker_log


def quick_overrides(tmp_path: Path, tracking_uri: str) -> list[str]:
    """The quickstart shrunk to seconds (a few steps per trainer, a slice of each dataset, short sequences), every
    output (stage directories, MLflow store) under `tmp_path` instead of the checkout's `runs/`."""
    small = {"batch_size": 4, "max_prompt_len": 48, "max_response_len": 32, "checkpoint_every": 0}
    return [
        f"work_dir={tmp_path / 'work'}",
        f"tracking.tracking_uri={tracking_uri}",
        *(
            f"datasets.{name}.limit={n}"
            for name, n in (("demonstrations", 24), ("preferences", 24), ("prompts_train", 8), ("prompts_eval", 4))
        ),
        "datasets.eval_fraction=0.25",
        "lengths.allow_truncation=true",  # short sequences on purpose: seconds per stage
        *(f"{stage}.{key}={value}" for stage in ("sft", "reward_model", "dpo") for key, value in small.items()),
        *(f"{stage}.max_steps=2" for stage in ("sft", "reward_model", "dpo")),
        "evaluation.num_prompts=4",
        "evaluation.batch_size=4",
        "evaluation.sampling.max_new_tokens=8",
    ]


@pytest.mark.slow
def test_quickstart_deployment_runs_on_a_real_prefect_server(tmp_path: Path) -> None:
    # Given: a temporary MLflow store and stage directory, and the quickstart shrunk to a few steps per stage.
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parameters = {"config_path": "configs/quickstart.yaml", "overrides": quick_overrides(tmp_path, tracking_uri)}

    # When: deployed from prefect.yaml and triggered like docs/deployment.md does.
    run, task_runs, worker_log = serve_and_run(
        tmp_path, "rlhf-pipeline/quickstart", parameters, {"MLFLOW_TRACKING_URI": tracking_uri}, DEADLINE_S
    )

    # Then: the run completed with a task run per stage, and MLflow holds its parent run tagged with its id.
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n--- worker log ---\n{worker_log[-6000:]}"
    stages = {t["name"].rsplit("-", 1)[0] for t in task_runs if t["state"]["type"] == "COMPLETED"}
    assert {"validate", "sft", "dpo", "evaluate"} <= stages, stages
    client = MlflowClient(tracking_uri)
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'",
    )
    assert len(parents) == 1 and parents[0].data.tags["rlhf.kind"] == "pipeline"


@pytest.mark.slow
def test_rlhf_run_shows_each_stage_and_where_to_look(tmp_path: Path) -> None:
    # Given the quickstart shrunk to a few steps per stage, writing under tmp_path.
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [arg for pair in quick_overrides(tmp_path, tracking_uri) for arg in ("--set", pair)]

    # When `rlhf run` runs it, as its own process (Prefect's temporary server lives and dies with it).
    env = {**os.environ, "COLUMNS": "250", "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "configs/quickstart.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    # Then one progress line per stage, and the ids printed are those of the Prefect flow run and of the MLflow
    # parent run tagged with it.
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-4000:]
    assert "stages: validate → sft → reward_model → dpo → evaluate" in out
    for i, stage in enumerate(["validate", "sft", "reward_model", "dpo", "evaluate"], start=1):
        assert f"[{i}/5] ✔ {stage} completed in " in out
    flow_run_id = re.search(r"Prefect flow run\s+([0-9a-f-]{36})", out)[1]
    parent_id = re.search(r"MLflow pipeline run\s+([0-9a-f]{32})", out)[1]
    parent = MlflowClient(tracking_uri).get_run(parent_id)
    assert parent.data.tags["prefect.flow_run_id"] == flow_run_id
    assert "rlhf-policy v1 @candidate" in out
    assert f"rlhf lineage models:/rlhf-policy@candidate --tracking-uri {tracking_uri}" in out


def test_rlhf_ui_serves_the_local_store_on_localhost(tmp_path: Path) -> None:
    # Given a local store with one experiment.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("seen-by-ui", artifact_location=(tmp_path / "art").as_uri())
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=seen-by-ui"

    def experiment() -> dict | None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            return None

    # When `rlhf ui` runs; then it answers on 127.0.0.1 with that store's experiments.
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "ui",
        "--port",
        str(port),
        "--tracking-uri",
        uri,
        "--artifact-root",
        (tmp_path / "art").as_uri(),
    ]
    with background(command, dict(os.environ), tmp_path / "ui.log") as proc:
        body = wait_until(lambda: experiment() or proc.poll() is not None, 120, "rlhf ui", interval=0.5)
        assert proc.poll() is None, (tmp_path / "ui.log").read_text()
    assert body["experiment"]["name"] == "seen-by-ui"
