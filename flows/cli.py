"""The `rlhf` command line: run the pipeline, check data, talk to a model, trace where a model came from.

    rlhf run configs/quickstart.yaml --set dpo.max_steps=20     # the whole DAG, progress per stage
    rlhf validate data/support_bot/preferences.jsonl --kind preference
    rlhf generate models:/rlhf-policy@champion --prompt "My parcel is late"
    rlhf chat runs:/<run id>/model
    rlhf lineage models:/rlhf-policy@candidate [--json]
    rlhf runs --experiment quickstart                           # recent pipeline runs and their evaluation
    rlhf ui                                                     # MLflow UI on the local store
    rlhf label runs/collect/<key>/tasks.jsonl --labeler ana     # rank sampled responses in the browser

MLflow is found through `--tracking-uri`, else `--config`'s store, else `MLFLOW_TRACKING_URI`, else the pipeline's
default local store (`runs/mlflow.db`). Heavy imports (torch, prefect, mlflow) happen inside the commands, so
`rlhf --help` answers at once.

Bad input (a config that is not YAML, a malformed task file, invalid data) is one line on stderr and a non-zero
exit, and so is any error a command did not expect; `rlhf --debug COMMAND …` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from flows.model_store import ModelLookupFailed, ModelNotFound, mlflow_client, resolve_model_dir
from flows.servers import run_server

MODEL_CACHE_ENV = "RLHF_MODEL_CACHE"

# Usage errors, `Exit` and `Abort` are the framework's own exits (it prints them). Found by name: typer vendors
# click's exception classes in recent releases and re-exports click's in older ones.
_CLI_EXITS = (typer.Exit, typer.Abort, next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


class _OneLineErrors(TyperGroup):
    """Runs a command; an exception it did not turn into an exit itself becomes one line on stderr and exit 1
    (`--debug`: raised, with its traceback)."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _CLI_EXITS:
            raise
        except Exception as exc:
            if debug:
                raise
            raise _fail(f"{type(exc).__name__}: {exc} (rlhf --debug … shows the traceback)") from exc


app = typer.Typer(
    name="rlhf", cls=_OneLineErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
debug = False
verbose = False


@app.callback()
def _main(
    debug_option: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
    verbose_option: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the libraries' INFO logs (Prefect, MLflow) too.")
    ] = False,
) -> None:
    """The RLHF pipeline: validated data → SFT → reward model → PPO/DPO → evaluation → inference."""
    global console, err_console, debug, verbose
    # Fresh consoles per invocation: the terminal (or $COLUMNS) may differ from the one seen at import.
    console = Console(highlight=False)
    err_console = Console(stderr=True, highlight=False)
    debug = debug_option
    verbose = verbose_option


TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri", help="MLflow tracking URI (default: --config's store, $MLFLOW_TRACKING_URI, the local store)."
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", exists=True, dir_okay=False, help="Read the MLflow store from this pipeline config."
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    # soft_wrap: one line whatever the terminal's width (a test or a log can match it).
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _bad_input(exc: Exception, code: int = 2) -> typer.Exit:
    """`_fail` with the message of `exc`, an error in the user's input; under `--debug`, `exc` is re-raised."""
    if debug:
        raise exc
    return _fail(str(exc), code)


# ---------------------------------------------------------------------------------------------------------------
# MLflow plumbing shared by the commands
# ---------------------------------------------------------------------------------------------------------------


def _default_pipeline_config() -> Any:
    """A `PipelineConfig` holding only defaults, unvalidated: the defaults live in one place, `flows.config`."""
    from flows.config import PipelineConfig

    return PipelineConfig.model_construct()


def default_tracking_uri() -> str:
    """The pipeline's default tracking URI (`sqlite:///<abs work_dir>/mlflow.db`, work_dir `runs`)."""
    return _default_pipeline_config().tracking_uri()


def _config_of(config: Path | None) -> Any | None:
    if config is None:
        return None
    from flows.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        raise _bad_input(exc) from exc


def resolve_tracking_uri(option: str | None, config: Path | None = None) -> str:
    """`--tracking-uri`, else the store of `--config`, else `$MLFLOW_TRACKING_URI`, else the pipeline default."""
    if option:
        return option
    cfg = _config_of(config)
    if cfg is not None:
        return cfg.tracking_uri()
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


# ---------------------------------------------------------------------------------------------------------------
# rlhf run
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def run(
    config: Annotated[
        Path,
        typer.Argument(
            help="Pipeline YAML (e.g. configs/quickstart.yaml).", exists=True, dir_okay=False, readable=True
        ),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one config key, dotted: --set dpo.max_steps=20 (repeatable)."),
    ] = None,
    tracking_uri: TrackingUri = None,
    verbose_option: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the libraries' INFO logs (Prefect task states, MLflow) too.")
    ] = False,
) -> None:
    """Run the pipeline flow: validate → sft → reward model → ppo | dpo → evaluate, each stage cached.

    Shows a line when each stage starts and ends and, on a terminal, a progress bar per training stage (plain
    progress lines when the output is not a terminal); the libraries' INFO logs only with --verbose.
    """
    # Offline by default (the machine may have no network): no usage telemetry from the temporary Prefect server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server migrates a fresh database first: on a busy 2-core machine that overruns Prefect's 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ["RLHF_CLI_PRINTS_RESULTS"] = "1"  # the flow leaves the result table to us
    loud = verbose or verbose_option
    if not loud:  # read when MLflow and Prefect are first imported (below); _quiet_library_chatter covers the rest
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from flows.config import ConfigError, load_config

    pairs = list(overrides or [])
    if tracking_uri:
        pairs.append(f"tracking.tracking_uri={tracking_uri}")
    try:
        cfg = load_config(config, pairs)
    except ConfigError as exc:
        raise _bad_input(exc) from exc
    from flows.pipeline import rlhf_pipeline
    from flows.run_report import StageProgress, where_to_look
    from tasks.runner import stage_listener

    _quiet_library_chatter(loud)
    stages = cfg.active_stages()
    console.rule(f"[bold]rlhf pipeline[/] {escape(str(config))}")
    console.print(f"stages: {' → '.join(stages)}")
    with stage_listener(StageProgress(console, stages)):
        state = rlhf_pipeline(str(config), pairs, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id)
    result = state.result(raise_on_failure=False) if state.is_completed() else None
    console.rule()
    console.print(where_to_look(cfg, flow_run_id, result, default_tracking_uri()))
    table = result.results_table() if result is not None else None
    if table:
        console.rule("[bold]result[/]: the evaluated models on the held-out prompts")
        console.print(escape(table))
    if not state.is_completed():
        raise _fail(f"pipeline finished in state {state.name}: {state.message or ''}")


def _quiet_library_chatter(verbose: bool) -> None:
    """The stage lines and the trainers' progress bars are the progress display: no per-load progress bars from
    transformers and, unless `verbose`, no INFO lines from MLflow (database set-up, system-metrics sampler) or
    on Prefect's console (task states, the temporary server); warnings and errors still show. Prefect's loggers
    keep INFO, so the Prefect UI keeps every record."""
    from prefect.logging.handlers import PrefectConsoleHandler
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if verbose:
        return
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


# ---------------------------------------------------------------------------------------------------------------
# rlhf validate
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def validate(
    data: Annotated[Path, typer.Argument(help="A .jsonl, .json, .parquet or .csv file, or a saved dataset dir.")],
    kind: Annotated[str, typer.Option(help="demonstration | preference | ranking | prompt")],
    data_format: Annotated[
        str | None, typer.Option("--format", help="Format hint: trl, hh-rlhf, messages (default: detect).")
    ] = None,
) -> None:
    """Check a data file against its schema: the full error report (exit 1), or row counts and digest."""
    if kind not in ("demonstration", "preference", "ranking", "prompt"):
        raise typer.BadParameter(f"unknown kind {kind!r}", param_hint="--kind")
    if not data.exists():
        raise _fail(f"{data}: no such file")
    from schemas import DataValidationError, content_digest, load_rows

    try:
        rows = list(load_rows(data, kind, format=data_format).rows)
    except DataValidationError as exc:
        err_console.print(f"[bold red]✘ {escape(str(data))} is not valid {kind} data[/]", soft_wrap=True)
        err_console.print(escape(str(exc)), soft_wrap=True)
        raise typer.Exit(1) from exc
    conversational = sum(1 for row in rows if isinstance(row["prompt"], list))
    console.print(
        f"[green]✔[/] {escape(str(data))}: {len(rows)} valid {kind} rows "
        f"({conversational} conversational, {len(rows) - conversational} plain text)"
    )
    console.print(f"digest {content_digest(rows)}")


# ---------------------------------------------------------------------------------------------------------------
# rlhf generate / chat
# ---------------------------------------------------------------------------------------------------------------


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None, greedy: bool) -> Any:
    from rlhf_core.generation import SamplingConfig

    try:
        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            do_sample=not greedy,
            seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _load(
    model: str,
    tracking_uri: str | None,
    config: Path | None,
    cache_dir: Path | None,
    trust_remote_code: bool,
    device: str | None,
) -> tuple[Any, Any]:
    """Resolve MODEL to a local directory and load `(model, tokenizer)` (safetensors only, eval mode)."""
    import torch

    from rlhf_core.inference import load_policy

    cache = cache_dir or Path(os.environ.get(MODEL_CACHE_ENV) or _default_pipeline_config().work_path() / "model_cache")
    is_local = Path(model).expanduser().exists()
    try:
        model_dir = resolve_model_dir(
            model, "" if is_local else resolve_tracking_uri(tracking_uri, config), cache, status=console.status
        )
    except ModelLookupFailed as exc:
        raise _fail(str(exc)) from exc
    except ModelNotFound as exc:
        raise typer.BadParameter(str(exc)) from exc
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with console.status(f"Loading {model_dir} on {device} …"):
        # Still safetensors only; the model's own code runs only with --trust-remote-code.
        return load_policy(model_dir, device=device, trust_remote_code=trust_remote_code)


def _read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[Any]:
    """The prompts to answer: strings, or message lists from a conversational prompt file."""
    if bool(prompts) == (prompts_file is not None):
        raise typer.BadParameter("give --prompt (repeatable) or --prompts-file, not both and not neither")
    if prompts:
        return list(prompts)
    assert prompts_file is not None
    if prompts_file.suffix == ".txt":
        return [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    from schemas import DataValidationError, load_rows

    try:
        return [row["prompt"] for row in load_rows(prompts_file, "prompt").rows]
    except DataValidationError as exc:
        raise _fail(str(exc)) from exc


CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", help=f"Where MLflow models are downloaded (default ${MODEL_CACHE_ENV}, else runs/model_cache)."
    ),
]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Allow the model's own Python code to run (off: only built-in architectures)."
    ),
]
ModelArg = Annotated[
    str,
    typer.Argument(
        help="Local model directory, models:/rlhf-policy@champion, models:/<name>/<version> or runs:/<run id>/model."
    ),
]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1)]
Temperature = Annotated[float, typer.Option("--temperature")]
TopP = Annotated[float, typer.Option("--top-p")]
TopK = Annotated[int, typer.Option("--top-k", min=0)]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed of the sampler (same seed, same text).")]
Greedy = Annotated[bool, typer.Option("--greedy", help="Argmax decoding instead of sampling.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1, mps (default: cuda if any).")]


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts-file", exists=True, dir_okay=False, help=".txt (one prompt a line) or prompt-only data file."
        ),
    ] = None,
    max_new_tokens: MaxNewTokens = 64,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    seed: Seed = 0,
    greedy: Greedy = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print [{prompt, response}] as JSON.")] = False,
    trust_remote_code: TrustRemoteCode = False,
    device: DeviceOpt = None,
    tracking_uri: TrackingUri = None,
    config: ConfigOpt = None,
    cache_dir: CacheDir = None,
) -> None:
    """Generate one response per prompt (chat template applied, batched)."""
    from rlhf_core.inference import generate_text

    prompts = _read_prompts(prompt, prompts_file)
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, seed, greedy)
    policy, tokenizer = _load(model, tracking_uri, config, cache_dir, trust_remote_code, device)
    responses = generate_text(policy, tokenizer, prompts, sampling)
    if as_json:
        print(
            json.dumps(
                [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)],
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    for text_prompt, response in zip(prompts, responses, strict=True):
        console.print(f"[bold cyan]prompt[/]  {escape(str(text_prompt))}")
        console.print(f"[bold green]model[/]   {escape(response)}\n")


@app.command()
def chat(
    model: ModelArg,
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    seed: Seed = None,
    greedy: Greedy = False,
    trust_remote_code: TrustRemoteCode = False,
    device: DeviceOpt = None,
    tracking_uri: TrackingUri = None,
    config: ConfigOpt = None,
    cache_dir: CacheDir = None,
) -> None:
    """Talk to a model in the terminal (the conversation is kept; `/reset` clears it, `/exit` or Ctrl-D quits)."""
    from rlhf_core.inference import chat_loop

    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, seed, greedy)
    policy, tokenizer = _load(model, tracking_uri, config, cache_dir, trust_remote_code, device)
    console.print("[dim]/reset clears the conversation, /exit or Ctrl-D quits[/]")

    def read_user(_prompt: str) -> str:
        try:
            return console.input("[bold cyan]you[/] > ")
        except KeyboardInterrupt:
            console.print()
            raise EOFError from None  # Ctrl-C ends the chat like Ctrl-D

    def show(text: str) -> None:
        console.print(f"[bold green]model[/] > {escape(text)}")

    chat_loop(policy, tokenizer, sampling, read_user, show)


# ---------------------------------------------------------------------------------------------------------------
# rlhf lineage
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def lineage(
    model_uri: Annotated[
        str,
        typer.Argument(
            help="models:/rlhf-policy@candidate, models:/<name>/<version>, runs:/<run id>/model or a run id."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the tree as JSON.")] = False,
    params: Annotated[bool, typer.Option("--params/--no-params", help="List each stage's config.")] = True,
    tracking_uri: TrackingUri = None,
    config: ConfigOpt = None,
) -> None:
    """Walk back from a model to the runs, dataset digests and configs that made it.

    Exit status: 0 complete, 1 the model URI cannot be resolved, 2 some upstream pointer leads nowhere.
    """
    from flows.lineage import LineageError, render_lineage, walk_lineage

    client = mlflow_client(resolve_tracking_uri(tracking_uri, config))
    try:
        root = walk_lineage(model_uri, client)
    except LineageError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        print(json.dumps(root.to_dict(), indent=2, sort_keys=False))
    else:
        console.print(render_lineage(root, show_params=params))
    problems = root.problems()
    if problems:
        for problem in problems:
            err_console.print(f"[bold red]incomplete lineage:[/] {escape(problem)}")
        raise typer.Exit(2)


# ---------------------------------------------------------------------------------------------------------------
# rlhf runs
# ---------------------------------------------------------------------------------------------------------------


@app.command()
def runs(
    experiment: Annotated[
        str | None,
        typer.Option("--experiment", "-e", help="Experiment name (default: --config's, else every experiment)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many runs, newest first.")] = 20,
    wide: Annotated[bool, typer.Option("--wide", help="Every metric, the registered model and the run id.")] = False,
    tracking_uri: TrackingUri = None,
    config: ConfigOpt = None,
) -> None:
    """The recent pipeline runs and their policy's evaluation: gold score and win rate, RM win rate, KL, no-EOS."""
    from rich import box

    from flows.runs import RunsError, columns, recent_pipeline_runs

    cfg = _config_of(config)
    name = experiment or (cfg.tracking.experiment_name if cfg is not None else None)
    uri = resolve_tracking_uri(tracking_uri, config)
    try:
        rows = recent_pipeline_runs(mlflow_client(uri), name, limit)
    except RunsError as exc:
        raise _fail(str(exc)) from exc
    if not rows:
        console.print(f"no pipeline runs in {escape(uri)}" + (f", experiment {escape(name)}" if name else ""))
        return
    experiments = sorted({row.experiment for row in rows})
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        title_justify="left",
        title=f"pipeline runs of experiment{'s' if len(experiments) > 1 else ''} {escape(', '.join(experiments))}",
    )
    for header in columns(wide):
        table.add_column(header, no_wrap=True, justify="right" if header in columns(True)[4:-2] else "left")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row.cells(wide)))
    console.print(table)


# ---------------------------------------------------------------------------------------------------------------
# rlhf ui
# ---------------------------------------------------------------------------------------------------------------


def mlflow_ui_command(
    tracking_uri: str, artifact_root: str | None, host: str, port: int, workers: int = 1
) -> list[str]:
    """`mlflow ui` on a local store; the artifact root must match the one the pipeline logs to."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri]
    command += ["--host", host, "--port", str(port), "--workers", str(workers)]
    if artifact_root:
        command += ["--default-artifact-root", artifact_root]
    return command


def default_artifact_root() -> str:
    """The pipeline's default artifact location (`file://<abs work_dir>/mlartifacts`)."""
    return _default_pipeline_config().artifact_location()


@app.command()
def ui(
    host: Annotated[
        str, typer.Option(help="Interface to bind (keep 127.0.0.1 unless you mean to share).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes (one is plenty for one user).")] = 1,
    tracking_uri: TrackingUri = None,
    config: ConfigOpt = None,
    artifact_root: Annotated[str | None, typer.Option(help="Artifact root (default: the pipeline's).")] = None,
) -> None:
    """Start the MLflow UI on the local store (Ctrl-C stops it)."""
    uri = resolve_tracking_uri(tracking_uri, config)
    if uri.startswith(("http://", "https://")):
        console.print(f"The tracking store is already a server: open {uri}")
        return
    cfg = _config_of(config)
    root = artifact_root or (cfg.artifact_location() if cfg is not None else default_artifact_root())
    command = mlflow_ui_command(uri, root, host, port, workers)
    console.print(f"MLflow UI on [bold]http://{host}:{port}[/] for {escape(uri)} (Ctrl-C stops it)")
    raise typer.Exit(run_server(command))


@app.command()
def label(
    task_file: Annotated[Path, typer.Argument(help="The collect stage's tasks.jsonl (its message names it).")],
    labeler: Annotated[str | None, typer.Option(help="Your name, put in the printed URL.")] = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind (keep 127.0.0.1 unless you mean to share).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the labeling page.")] = 8765,
    answers_dir: Annotated[
        Path | None,
        typer.Option(help="Where <labeler>.jsonl answers go (default: tasks.answers/ beside the task file)."),
    ] = None,
) -> None:
    """Serve the labeling page: rank each prompt's sampled responses; every answer is saved at once."""
    from flows.labeling_app import make_server, serve_server

    if not task_file.is_file():
        raise _fail(f"no task file at {task_file} (the collect stage prints its path)")
    try:
        server = make_server(task_file, answers_dir, host, port)
    except ValueError as exc:  # a malformed task file: the message names its line
        raise _bad_input(exc) from exc
    except OSError as exc:  # the port is taken, the address is not this machine's
        raise _bad_input(OSError(f"cannot serve on {host}:{port}: {exc.strerror or exc}")) from exc
    serve_server(server, labeler)


if __name__ == "__main__":
    app()
