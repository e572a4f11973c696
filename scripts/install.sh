#!/usr/bin/env bash
# Creates the virtual environment (VENV, default .venv) if missing and installs the project into it, with the
# exact versions of requirements/constraints-cpu.txt (refreshed by scripts/lock.sh). RLHF_UNLOCKED=1 installs
# the newest versions pyproject.toml allows instead.
# torch is installed first and pinned because an unpinned torch pulls a multi-GB CUDA build;
# set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

pip_install() {  # quiet pip install; drops pip's noisy "WARNING: Location" lines but keeps its exit status
  python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

LOCK=(-c requirements/constraints-cpu.txt)
[ "${RLHF_UNLOCKED:-0}" = "1" ] && LOCK=()
pip_install --upgrade pip
# shellcheck disable=SC2086
pip_install ${LOCK[@]+"${LOCK[@]}"} ${TORCH_SPEC:-torch==2.13.0}
# `ray`: the Ray launch backend, which tests/test_launch.py runs against a local cluster (~240 MB installed).
pip_install ${LOCK[@]+"${LOCK[@]}"} -e ".[dev,ray${EXTRAS:+,$EXTRAS}]"
python -c "import torch, transformers, prefect, mlflow; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| prefect', prefect.__version__, '| mlflow', mlflow.__version__)"
