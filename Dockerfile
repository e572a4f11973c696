# The project as an image: what a Prefect Kubernetes (or Docker) worker runs a flow run in.
#
#   docker build -t rlhf-pipeline:cpu .                                            # CPU torch (default)
#   docker build -t rlhf-pipeline:cu128 \
#     --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
#
# The locked versions of requirements/constraints-cpu.txt are installed (the torch pin matches the CPU and the
# CUDA wheels), plus the `ray` extra for `launch: {backend: ray}`. The working directory is the repository root
# (/app), as for a local worker: relative config, data and `runs/` paths resolve against it. Mount `runs/` (stage
# directories, the default MLflow store) from a volume, or point `tracking.tracking_uri` at an MLflow server.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ARG EXTRAS="ray"

# No .git in the image: runs from it carry `rlhf.code_version` (package version + hash of the library sources),
# not `rlhf.git_commit`.

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/app/runs/hf \
    MPLBACKEND=Agg
RUN python -m venv "$VIRTUAL_ENV" && python -m pip install -q --upgrade pip

WORKDIR /app
# torch in a layer of its own (the largest download; it survives code edits), then the project with its locked
# dependencies.
COPY requirements/ requirements/
RUN python -m pip install -q -c requirements/constraints-cpu.txt $TORCH_SPEC
COPY pyproject.toml README.md ./
COPY rlhf_core/ rlhf_core/
COPY schemas/ schemas/
COPY tasks/ tasks/
COPY flows/ flows/
RUN python -m pip install -q -c requirements/constraints-cpu.txt -e ".[${EXTRAS}]"
COPY configs/ configs/
COPY data/ data/
COPY prefect.yaml ./

# A non-root user that can write runs/ (mount a volume there to keep it).
RUN useradd --create-home --uid 1000 rlhf && mkdir -p runs && chown rlhf:rlhf runs
USER rlhf
RUN python -c "import torch, transformers, prefect, mlflow, rlhf_core; print('torch', torch.__version__)"
CMD ["rlhf", "--help"]
