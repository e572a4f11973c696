"""The README's screenshots of the two UIs, taken with headless Chromium (selenium, Debian's `chromium` and
`chromium-driver`):

- docs/images/mlflow-runs.png: the quickstart experiment's runs table in MLflow, pipeline runs only, with the
  evaluation (gold win rate, gold score, RM win rate, KL) and the key settings as columns;
- docs/images/prefect-flow-run.png: the latest `rlhf-pipeline` flow run in Prefect (its graph and task runs).

Regenerate, from the repository root with the virtual environment active:

    rlhf run configs/quickstart.yaml                       # a DPO pipeline run
    rlhf run configs/quickstart.yaml --set algorithm=ppo   # and a PPO one, to compare
    bash scripts/serve_local.sh                            # Prefect + MLflow servers and a worker; triggers the
                                                           # quickstart deployment: a DPO run that reuses (Cached)
                                                           # what the runs above trained
    python scripts/screenshots.py                          # waits for that flow run to finish, then shoots
    bash scripts/serve_local.sh stop

With other ports, pass the same PREFECT_PORT / MLFLOW_PORT to this script as to serve_local.sh. The Prefect login
is read from runs/serve/prefect_auth (written by serve_local.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 60
# What a person would pick under Columns to compare pipelines: the policy's evaluation, then the key settings.
MLFLOW_COLUMNS = [
    "metrics.`eval/win_rate_gold`",
    "metrics.`eval/gold_score`",
    "metrics.`eval/win_rate_rm`",
    "metrics.`eval/kl_to_ref`",
    "params.`algorithm`",
    "params.`dpo.dpo_beta`",
    "params.`ppo.kl_coef`",
]
COLUMN_WIDTHS = {
    "attributes.`Run Name`": 250,
    **dict.fromkeys(MLFLOW_COLUMNS[:4], 135),
    **dict.fromkeys(MLFLOW_COLUMNS[4:], 95),
}


def chromium(window: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, selenium-manager never downloads anything
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={window}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    return driver


def wait_for(driver, script: str, what: str, *args: object) -> object:
    """Poll a JavaScript predicate until it returns something truthy (the page is a single-page app)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what} on {driver.current_url}")


def mlflow_runs(driver, mlflow_url: str, experiment: str, out: Path) -> None:
    """The experiment's runs table, filtered to pipeline runs, with the evaluation columns."""
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By

    found = MlflowClient(tracking_uri=mlflow_url).get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} on {mlflow_url}: run the quickstart first")
    driver.get(f"{mlflow_url}/health")  # same origin: the storage written next is the UI's
    state = {
        "searchFilter": "tags.`rlhf.kind` = 'pipeline'",
        "selectedColumns": MLFLOW_COLUMNS,
        "columnOrder": ["attributes.`Run Name`", *MLFLOW_COLUMNS],
        "columnWidths": COLUMN_WIDTHS,
    }
    driver.execute_script(
        "localStorage.setItem(arguments[0], arguments[1]);"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{found.experiment_id}"]-ReactComponentState',
        json.dumps(state),
    )
    driver.get(f"{mlflow_url}/#/experiments/{found.experiment_id}/runs")
    wait_for(
        driver,
        "return [...document.querySelectorAll('[col-id=\"metrics.`eval/win_rate_gold`\"]')]"
        ".some(c => /\\d/.test(c.innerText))",
        "the runs table with win rates",
    )
    driver.find_element(By.CSS_SELECTOR, "[aria-label='Toggle sidebar']").click()  # room for the columns
    time.sleep(2)  # let the last cells and fonts settle
    driver.save_screenshot(str(out))


def latest_flow_run(prefect_api: str, auth: str) -> str:
    """The id of the latest `rlhf-pipeline` flow run, once it has finished."""
    os.environ.update(PREFECT_API_URL=prefect_api, PREFECT_API_AUTH_STRING=auth)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + 1800
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["rlhf-pipeline"])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=1,
            )
            if not runs:
                raise SystemExit(f"no rlhf-pipeline flow run on {prefect_api}: run scripts/serve_local.sh first")
            if runs[0].state is not None and runs[0].state.is_final():
                return str(runs[0].id)
            if time.monotonic() > deadline:
                raise SystemExit(f"flow run {runs[0].id} has not finished")
            print(f"waiting for flow run {runs[0].name} ({runs[0].state_name}) ...")
            time.sleep(10)


def prefect_flow_run(driver, prefect_url: str, auth: str, flow_run_id: str, out: Path) -> None:
    """The flow run's page: its graph (one node per stage task run, Cached or Completed) and its runs list."""
    from selenium.webdriver.common.by import By

    driver.get(f"{prefect_url}/login")
    field = wait_for(driver, "return document.querySelector('input[type=password]')", "the Prefect login page")
    field.send_keys(auth)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(driver, "return !location.pathname.startsWith('/login')", "the Prefect login")
    driver.get(f"{prefect_url}/runs/flow-run/{flow_run_id}")
    wait_for(
        driver,
        "return document.querySelector('canvas') && document.body.innerText.includes('evaluate')",
        "the flow run graph",
    )
    # Below the graph, the task runs with their state by name (Completed, or Cached for a reused stage).
    tab = wait_for(
        driver,
        "return [...document.querySelectorAll('.p-tab, [role=tab]')].find(e => e.innerText.trim() === 'Task Runs')",
        "the Task Runs tab",
    )
    tab.click()
    wait_for(
        driver,
        "return (document.body.innerText.match(/\\b(Cached|Completed)\\b/g) || []).length > 3",
        "the task runs' states",
    )
    time.sleep(4)  # the graph animates its layout
    driver.save_screenshot(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefect-url", default=f"http://127.0.0.1:{os.environ.get('PREFECT_PORT', '4200')}")
    parser.add_argument("--mlflow-url", default=f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '5000')}")
    parser.add_argument("--auth-file", type=Path, default=REPO / "runs" / "serve" / "prefect_auth")
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--flow-run", help="flow run id (default: the latest rlhf-pipeline run)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--window", default="1400,900")
    args = parser.parse_args()

    auth = args.auth_file.read_text().strip()
    flow_run_id = args.flow_run or latest_flow_run(f"{args.prefect_url}/api", auth)
    driver = chromium(args.window)
    try:
        mlflow_runs(driver, args.mlflow_url, args.experiment, args.out / "mlflow-runs.png")
        width, height = (int(n) for n in args.window.split(","))
        driver.set_window_size(width, height + 300)  # the graph, and the task-run list under it
        prefect_flow_run(driver, args.prefect_url, auth, flow_run_id, args.out / "prefect-flow-run.png")
    finally:
        driver.quit()
    for name in ("mlflow-runs.png", "prefect-flow-run.png"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
