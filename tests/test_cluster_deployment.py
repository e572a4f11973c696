"""The GPU deployment on Kubernetes, checked as far as this machine allows (no cluster, no GPU, no Docker daemon).

Given `deploy/kubernetes-gpu-job-template.json` (the work pool's base job template) and the `smollm2-dpo-gpu`
deployment of `prefect.yaml`:
- when the pool is created on a real Prefect server (its test harness), then the server accepts the template
  (it checks that every `{{ variable }}` of the job configuration is declared), and the deployment with its job
  variables (checked against the template's variable schema; a negative GPU count is refused);
- when Prefect renders the Kubernetes job of a flow run from the template and the deployment's job variables
  (`BaseJobConfiguration.from_template_and_values`, what a worker does), then the pod runs the deployment's image
  in the Dockerfile's working directory, asks for the GPUs the stages' `launch.processes` use, mounts the `runs/`
  volume where the pipeline's default work dir is, gives the ranks shared memory, and carries the environment.
What this does not show: that a cluster schedules the job, or that the image builds (docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import PrefectHTTPStatusError
from prefect.workers.base import BaseJobConfiguration

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "kubernetes-gpu-job-template.json"
DEPLOYMENT = "smollm2-dpo-gpu"


class KubernetesJob(BaseJobConfiguration):
    """The fields of a Kubernetes worker's job configuration that the template fills (the worker's own class
    lives in prefect-kubernetes, which a cluster's worker installs)."""

    namespace: str
    job_manifest: dict[str, Any]
    cluster_config: dict[str, Any] | None = None
    job_watch_timeout_seconds: int | None = None
    pod_watch_timeout_seconds: int
    stream_output: bool


def deployment() -> dict:
    found = [d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == DEPLOYMENT]
    assert len(found) == 1
    return found[0]


def render(template: dict, job_variables: dict) -> KubernetesJob:
    async def build() -> KubernetesJob:
        async with get_client() as client:
            return await KubernetesJob.from_template_and_values(template, job_variables, client=client)

    return asyncio.run(build())


def test_the_gpu_deployment_renders_a_kubernetes_job_with_its_gpus_image_and_volumes(prefect_api: str) -> None:
    template = json.loads(TEMPLATE.read_text())
    spec = deployment()
    variables = spec["work_pool"]["job_variables"]

    # The server accepts the template as a Kubernetes pool's base job template, and the deployment on that pool
    # (it checks the job variables against the template's variable schema: types, minimums, enums).
    pool = f"{spec['work_pool']['name']}-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template))
        assert client.read_work_pool(pool).base_job_template == template
        flow_id = client.create_flow_from_name("rlhf-pipeline")
        deployment_id = client.create_deployment(
            flow_id,
            spec["name"],
            work_pool_name=pool,
            entrypoint=spec["entrypoint"],
            parameters=spec["parameters"],
            job_variables=variables,
            pull_steps=spec["pull"],
        )
        assert client.read_deployment(deployment_id).job_variables == variables
        with pytest.raises(PrefectHTTPStatusError, match="422"):  # a variable the template forbids is refused
            client.create_deployment(flow_id, "negative-gpus", work_pool_name=pool, job_variables={"gpus": -1})

    job = render(template, variables)
    pod = job.job_manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == variables["image"] and container["imagePullPolicy"] == "Always"
    # The GPUs the pod gets are the processes every training stage launches (one rank per GPU).
    processes = [o for o in spec["parameters"]["overrides"] if o.startswith("launch.processes=")]
    assert processes == [f"launch.processes={variables['gpus']}"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == variables["gpus"] == 2
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    # Code where the Dockerfile put it, and where the deployment's pull step expects it.
    workdir = re.search(r"^WORKDIR (\S+)$", (REPO / "Dockerfile").read_text(), re.M).group(1)
    [pull] = spec["pull"]
    assert container["workingDir"] == workdir == pull["prefect.deployments.steps.set_working_directory"]["directory"]
    # runs/ (the default work_dir: checkpoints for a resume, models, the default MLflow store) on the volume.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["runs"] == f"{workdir}/runs"
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "rlhf-runs"
    assert mounts["shm"] == "/dev/shm" and volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    # The environment reaches the flow run's container; defaults of the pool stay unless overridden.
    assert job.env["MLFLOW_TRACKING_URI"] == variables["env"]["MLFLOW_TRACKING_URI"]
    assert container["env"]["OMP_NUM_THREADS"] == "4"
    assert job.namespace == "rlhf" and job.job_manifest["metadata"]["namespace"] == "rlhf"


def test_a_pool_default_job_asks_for_no_gpu(prefect_api: str) -> None:
    """Without job variables (a CPU deployment on the same pool) the pod asks for no GPU."""
    template = json.loads(TEMPLATE.read_text())
    job = render(template, {})
    [container] = job.job_manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 0
    assert container["image"] == "rlhf-pipeline:cpu"


def test_the_image_installs_the_locked_versions_and_the_code() -> None:
    """The Dockerfile installs torch and the project with the lock file the tests ran against and copies what a
    flow run reads (code, configs, bundled data); `.dockerignore` keeps none of it out."""
    dockerfile = (REPO / "Dockerfile").read_text()
    ignored = (REPO / ".dockerignore").read_text().split()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line and "-c requirements/" in line]
    assert len(installs) == 2 and "$TORCH_SPEC" in installs[0] and '-e ".[${EXTRAS}]"' in installs[1]
    for copied in ("requirements/", "rlhf_core/", "schemas/", "tasks/", "flows/", "configs/", "data/"):
        assert f"COPY {copied} {copied}" in dockerfile and copied not in ignored
