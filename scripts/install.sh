#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it.
# torch is installed first and pinned because an unpinned torch pulls a multi-GB CUDA build;
# set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# shellcheck disable=SC2086
python -m pip install -q ${TORCH_SPEC:-torch==2.13.0} 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[dev${EXTRAS:+,$EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, transformers, prefect, mlflow; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| prefect', prefect.__version__, '| mlflow', mlflow.__version__)"
