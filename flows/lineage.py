"""Walk back from a model to the runs, data digests and configs that made it.

    registered model version (models:/rlhf-policy@candidate)
      └─ stage run (dpo)                    params = the stage config, tags = the lineage contract
           ├─ upstream sft run              rlhf.upstream.sft.run_id
           │    ├─ upstream validate run    rlhf.upstream.validate.run_id → rlhf.data.<name>.digest
           │    └─ base model               rlhf.upstream.base.model_uri (a local path or hub name)
           └─ ...

The tags followed here are the contract in `docs/lineage.md`; `tasks/` writes them. Only MLflow client calls are
made (no artifact downloads), so a walk is cheap and works against any tracking server. A pointer that leads
nowhere (a deleted or never-written run, a missing registered model version) becomes a `missing` node with the
reason, not an exception, so the rest of the tree is still shown; only an unresolvable *starting* URI raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from rich.markup import escape
from rich.tree import Tree

NodeKind = Literal["model_version", "run", "base_model", "missing"]

UPSTREAM_PREFIX = "rlhf.upstream."
DATA_PREFIX = "rlhf.data."
DIGEST_SUFFIX = ".digest"

_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)(?:/(?P<path>.*))?$")
_MODELS_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_MODELS_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/]+)$")
_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")


class LineageError(RuntimeError):
    """The starting model URI cannot be resolved (unknown registered model, alias, version or run)."""


@dataclass
class DatasetRef:
    """One dataset a stage read: its name and our full-content digest (plus MLflow's source, when logged)."""

    name: str
    digest: str
    source: str | None = None
    context: str | None = None


@dataclass
class LineageNode:
    """One node of the lineage tree.

    kind:
        `model_version` (a registered model version; its one child is the run that logged the model),
        `run` (an MLflow stage or other run), `base_model` (a model that no run produced: a local path or hub name),
        `missing` (a pointer that could not be followed; `error` says why).
    role: how the parent refers to this node (`sft`, `reward_model`, `base`, ...; `model` for the root's run).
    label: one-line human description.
    """

    kind: NodeKind
    role: str
    label: str
    run_id: str | None = None
    model_uri: str | None = None
    stage: str | None = None
    status: str | None = None
    experiment_id: str | None = None
    pipeline_run_id: str | None = None
    pipeline_config_hash: str | None = None
    flow_run_id: str | None = None
    cache_key: str | None = None
    code_version: str | None = None
    base_model: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    datasets: list[DatasetRef] = field(default_factory=list)
    registered: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    children: list[LineageNode] = field(default_factory=list)

    def walk(self) -> Iterator[LineageNode]:
        """Depth-first, pre-order iteration over this node and all its descendants."""
        yield self
        for child in self.children:
            yield from child.walk()

    def digests(self) -> dict[str, str]:
        """`{"<stage>/<dataset name>": digest}` over the whole tree (stage names keep two stages' `train` apart)."""
        return {f"{node.stage or node.role}/{ds.name}": ds.digest for node in self.walk() for ds in node.datasets}

    def problems(self) -> list[str]:
        """Every `missing` node's reason, in tree order (empty when the lineage is complete)."""
        return [node.error or node.label for node in self.walk() if node.kind == "missing"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (nested `children`); empty fields are dropped to keep `rlhf lineage --json` readable."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key == "children":
                continue
            if key == "datasets":
                value = [{k: v for k, v in ds.__dict__.items() if v is not None} for ds in value]
            if value not in (None, {}, []):
                out[key] = value
        out["children"] = [child.to_dict() for child in self.children]
        return out


def walk_lineage(model_uri: str, client: MlflowClient) -> LineageNode:
    """Resolve `model_uri` and follow every `rlhf.upstream.*` tag back to the base model and the data.

    model_uri: `models:/<name>@<alias>`, `models:/<name>/<version>`, `models:/m-<logged model id>`,
        `runs:/<run id>[/<path>]`, or a bare run id.
    client: an `MlflowClient` bound to the tracking (and registry) store holding the runs.

    Raises `LineageError` when the starting URI itself cannot be resolved.
    """
    return _Walker(client).start(model_uri.strip())


class _Walker:
    """Holds the client and a run cache: several stages often share an upstream (policy and reference = SFT)."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self._runs: dict[str, Any] = {}

    def start(self, uri: str) -> LineageNode:
        if match := _MODELS_ALIAS_URI.match(uri):
            return self._model_version(uri, match["name"], alias=match["alias"])
        if match := _LOGGED_MODEL_URI.match(uri):
            run_id = self._logged_model_run(match["model_id"], uri)
            return self._run_node(run_id, role="model", model_uri=uri, ancestors=())
        if match := _MODELS_VERSION_URI.match(uri):
            return self._model_version(uri, match["name"], version=match["version"])
        if match := _RUNS_URI.match(uri):
            run_id = match["run_id"]
        elif re.fullmatch(r"[0-9a-f]{32}", uri):
            run_id = uri
        else:
            raise LineageError(
                f"cannot walk lineage from {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version>, "
                "runs:/<run id>/<path> or a run id"
            )
        if self._get_run(run_id) is None:
            raise LineageError(f"run {run_id} (from {uri}) does not exist in the tracking store")
        return self._run_node(run_id, role="model", model_uri=uri, ancestors=())

    # -- registered models -------------------------------------------------------------------------------------

    def _model_version(self, uri: str, name: str, alias: str | None = None, version: str | None = None) -> LineageNode:
        try:
            if alias is not None:
                mv = self.client.get_model_version_by_alias(name, alias)
            elif version == "latest":
                versions = self.client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise LineageError(f"registered model {name!r} has no versions ({uri})")
                # search results omit aliases: fetch the newest version itself.
                mv = self.client.get_model_version(name, max(versions, key=lambda v: int(v.version)).version)
            else:
                mv = self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise LineageError(f"cannot resolve {uri}: {exc.message}") from exc
        node = LineageNode(
            kind="model_version",
            role="registered",
            label=f"{mv.name} v{mv.version}" + (f" @{', @'.join(mv.aliases)}" if mv.aliases else ""),
            model_uri=uri,
            run_id=mv.run_id or None,
            registered={
                "name": mv.name,
                "version": str(mv.version),
                "aliases": list(mv.aliases or []),
                "source": mv.source,
                "status": mv.status,
                "tags": dict(mv.tags or {}),
            },
        )
        run_id = mv.run_id or self._source_run(mv.source)
        if run_id is None:
            node.children.append(_missing("model", f"{node.label}: no run recorded for source {mv.source!r}"))
        else:
            node.children.append(self._run_node(run_id, role="model", model_uri=mv.source, ancestors=()))
        return node

    def _source_run(self, source: str | None) -> str | None:
        """The run behind a model version's `source` when the version itself carries no run id."""
        if not source:
            return None
        if match := _RUNS_URI.match(source):
            return match["run_id"]
        if match := _LOGGED_MODEL_URI.match(source):
            try:
                return self._logged_model_run(match["model_id"], source)
            except LineageError:
                return None
        return None

    def _logged_model_run(self, model_id: str, uri: str) -> str:
        try:
            logged = self.client.get_logged_model(model_id)
        except MlflowException as exc:
            raise LineageError(f"cannot resolve {uri}: {exc.message}") from exc
        if not logged.source_run_id:
            raise LineageError(f"logged model {model_id} ({uri}) records no source run")
        return logged.source_run_id

    # -- runs --------------------------------------------------------------------------------------------------

    def _get_run(self, run_id: str) -> Any | None:
        if run_id not in self._runs:
            try:
                self._runs[run_id] = self.client.get_run(run_id)
            except MlflowException:
                self._runs[run_id] = None
        return self._runs[run_id]

    def _run_node(self, run_id: str, role: str, model_uri: str | None, ancestors: tuple[str, ...]) -> LineageNode:
        run = self._get_run(run_id)
        if run is None:
            return _missing(role, f"upstream {role!r}: run {run_id} not found in the tracking store", run_id, model_uri)
        if run_id in ancestors:
            return _missing(role, f"upstream {role!r}: run {run_id} points back to itself (tag cycle)", run_id)
        tags = run.data.tags
        stage = tags.get("rlhf.stage")
        node = LineageNode(
            kind="run",
            role=role,
            label=f"{stage or run.info.run_name or 'run'} run {run_id}",
            run_id=run_id,
            model_uri=model_uri,
            stage=stage,
            status=run.info.status if run.info.lifecycle_stage == "active" else f"{run.info.status} (deleted)",
            experiment_id=run.info.experiment_id,
            cache_key=tags.get("rlhf.cache_key"),
            code_version=tags.get("rlhf.code_version"),
            base_model=tags.get("rlhf.base_model"),
            params=dict(sorted(run.data.params.items())),
            datasets=_datasets(run),
        )
        self._attach_pipeline(node, tags.get("mlflow.parentRunId"))
        for upstream_role, pointer in _upstream_pointers(tags).items():
            node.children.append(self._upstream(upstream_role, pointer, ancestors + (run_id,)))
        return node

    def _upstream(self, role: str, pointer: dict[str, str], ancestors: tuple[str, ...]) -> LineageNode:
        run_id = pointer.get("run_id") or self._source_run(pointer.get("model_uri"))
        if run_id:
            return self._run_node(run_id, role, pointer.get("model_uri"), ancestors)
        uri = pointer["model_uri"]
        return LineageNode(kind="base_model", role=role, label=f"base model {uri}", model_uri=uri)

    def _attach_pipeline(self, node: LineageNode, parent_id: str | None) -> None:
        """Copy the pipeline parent run's identity (config hash, Prefect flow run) onto a stage node."""
        if not parent_id:
            return
        node.pipeline_run_id = parent_id
        parent = self._get_run(parent_id)
        if parent is not None:
            node.pipeline_config_hash = parent.data.tags.get("rlhf.config_hash")
            node.flow_run_id = parent.data.tags.get("prefect.flow_run_id")


def _upstream_pointers(tags: dict[str, str]) -> dict[str, dict[str, str]]:
    """`rlhf.upstream.<role>.<field>` tags grouped as `{role: {field: value}}`, roles in sorted order."""
    pointers: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if key.startswith(UPSTREAM_PREFIX) and value:
            role, _, field_name = key[len(UPSTREAM_PREFIX) :].rpartition(".")
            if role and field_name in ("run_id", "model_uri"):
                pointers.setdefault(role, {})[field_name] = value
    return dict(sorted(pointers.items()))


def _datasets(run: Any) -> list[DatasetRef]:
    """The run's datasets: `rlhf.data.<name>.digest` tags (our full-content digest, authoritative) merged with the
    `mlflow.log_input` dataset inputs (which add the source and context)."""
    by_name: dict[str, DatasetRef] = {}
    for key, value in run.data.tags.items():
        if key.startswith(DATA_PREFIX) and key.endswith(DIGEST_SUFFIX):
            name = key[len(DATA_PREFIX) : -len(DIGEST_SUFFIX)]
            by_name[name] = DatasetRef(name=name, digest=value)
    inputs = run.inputs.dataset_inputs if run.inputs is not None else []
    for dataset_input in inputs:
        ds = dataset_input.dataset
        context = next((t.value for t in dataset_input.tags if t.key == "mlflow.data.context"), None)
        ref = by_name.setdefault(ds.name, DatasetRef(name=ds.name, digest=ds.digest))
        ref.source = ref.source or _source_uri(ds.source)
        ref.context = ref.context or context
    return sorted(by_name.values(), key=lambda ref: ref.name)


def _source_uri(source: str | None) -> str | None:
    """MLflow stores a dataset source as JSON (`{"uri": ...}`, `{"url": ...}`); show the location itself."""
    try:
        parsed = json.loads(source) if source else None
    except json.JSONDecodeError:
        return source
    if isinstance(parsed, dict):
        return next((str(parsed[k]) for k in ("uri", "url", "path") if k in parsed), source)
    return source


def _missing(role: str, reason: str, run_id: str | None = None, model_uri: str | None = None) -> LineageNode:
    return LineageNode(kind="missing", role=role, label=reason, run_id=run_id, model_uri=model_uri, error=reason)


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def _short(digest: str, width: int = 19) -> str:
    return digest if len(digest) <= width else digest[:width] + "…"


def _node_label(node: LineageNode) -> str:
    role = f"[dim]{escape(node.role)} ←[/] " if node.role not in ("model", "registered") else ""
    if node.kind == "missing":
        return f"{role}[bold red]✘ missing:[/] {escape(node.error or node.label)}"
    if node.kind == "base_model":
        return f"{role}[bold magenta]base model[/] {escape(node.model_uri or '')}"
    if node.kind == "model_version":
        reg = node.registered
        aliases = "".join(f" [yellow]@{escape(a)}[/]" for a in reg.get("aliases", []))
        return f"[bold]{escape(reg['name'])}[/] v{reg['version']}{aliases} [dim]{escape(reg.get('source') or '')}[/]"
    extra = f" [dim]pipeline {node.pipeline_run_id}[/]" if node.pipeline_run_id else ""
    return f"{role}[bold cyan]{escape(node.stage or 'run')}[/] run {node.run_id} [dim]{node.status}[/]{extra}"


def _add_details(branch: Tree, node: LineageNode, show_params: bool) -> None:
    if node.kind == "model_version":
        for key, value in sorted(node.registered.get("tags", {}).items()):
            if key.startswith("eval/") or key == "rlhf.evaluate_run_id":
                branch.add(f"[dim]{escape(key)}[/] {escape(value)}")
    if node.model_uri and node.kind == "run":
        branch.add(f"[dim]model[/] {escape(node.model_uri)}")
    if node.pipeline_config_hash:
        branch.add(
            f"[dim]pipeline config[/] {_short(node.pipeline_config_hash)}"
            + (f" [dim]prefect flow run[/] {node.flow_run_id}" if node.flow_run_id else "")
        )
    if node.cache_key:
        branch.add(f"[dim]cache key[/] {_short(node.cache_key)}  [dim]code[/] {escape(node.code_version or '?')}")
    for ds in node.datasets:
        where = f" [dim]{escape(ds.source)}[/]" if ds.source else ""
        branch.add(f"[green]data[/] {escape(ds.name)} {escape(ds.digest)}{where}")
    if node.params:
        config = branch.add(f"[dim]config ({len(node.params)} params)[/]")
        if show_params:
            for key, value in node.params.items():
                config.add(f"{escape(key)} = {escape(value)}")


def render_lineage(node: LineageNode, show_params: bool = True) -> Tree:
    """The lineage as a rich tree: each run with its model, pipeline, cache key, data digests and config.

    A run reached a second time (DPO's `sft` and `reference` are the same SFT run) is shown once in full, then
    as a one-line reference.
    """
    seen: set[str] = set()

    def add(parent: Tree | None, current: LineageNode) -> Tree:
        label = _node_label(current)
        repeat = current.kind == "run" and current.run_id in seen
        if repeat:
            label += " [dim](shown above)[/]"
        branch = parent.add(label) if parent is not None else Tree(label)
        if repeat:
            return branch
        if current.run_id and current.kind == "run":
            seen.add(current.run_id)
        _add_details(branch, current, show_params)
        for child in current.children:
            add(branch, child)
        return branch

    return add(None, node)
