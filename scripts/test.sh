#!/usr/bin/env bash
# Installs everything into .venv and runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
