"""Headless Chromium for the browser tests (Debian's `chromium` + `chromium-driver`, and `selenium`), and the MLflow
UI as a real `rlhf ui` process. A missing browser skips the test with the reason, and fails it in CI (`CI=true`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.required import skip_unless_ci

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@contextmanager
def headless_chromium(profile_dir: Path, window_size: str = "1100,1000", page_load_timeout: float = 15) -> Iterator:
    """A selenium Chrome driver on Debian's chromium (never a downloaded one), quit on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_unless_ci("selenium (pip install selenium)")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        skip_unless_ci(f"Debian's chromium and chromium-driver ({', '.join(missing)})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, selenium-manager never downloads anything
    for flag in (*CHROME_FLAGS, f"--window-size={window_size}", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(page_load_timeout)
    try:
        yield driver
    finally:
        driver.quit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_ui(tracking_uri: str, artifact_root: str, log: Path, timeout: float = 120) -> Iterator[str]:
    """`rlhf ui` on a free 127.0.0.1 port over `tracking_uri`; yields its base URL once `/health` answers, and
    stops its whole process group on exit."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "ui",
        "--port",
        str(port),
        "--tracking-uri",
        tracking_uri,
        "--artifact-root",
        artifact_root,
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(f"{url}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rlhf ui did not come up at {url}:\n{log.read_text(errors='replace')}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def open_mlflow_runs_table(driver, ui_url: str, experiment_id: str, search_filter: str, columns: list[str]) -> None:
    """Open an experiment's runs table filtered by `search_filter`, showing `columns` (e.g. "metrics.`eval/x`",
    "params.`algorithm`"): what a person picks under **Columns**, which the UI keeps in the browser's storage."""
    driver.get(f"{ui_url}/health")  # same origin, so the storage below is the UI's
    state = {"searchFilter": search_filter, "selectedColumns": columns}
    driver.execute_script(
        "localStorage.setItem(arguments[0], arguments[1]);"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"  # the assistant panel hides the table
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState',
        json.dumps(state),
    )
    driver.get(f"{ui_url}/#/experiments/{experiment_id}/runs")
