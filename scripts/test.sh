#!/usr/bin/env bash
# Installs everything into .venv and runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The labeling page is tested in a real headless browser: Debian's chromium + chromedriver.
# In CI (CI=true) a browser that cannot be installed fails the run: the browser test must not be skipped there.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
            >/tmp/rlhf-apt.log 2>&1; then
            tail -20 /tmp/rlhf-apt.log
            echo "could not install chromium + chromium-driver (log above)"
            if [ "${CI:-}" = true ]; then exit 1; fi
            echo "the browser test will be skipped"
        fi
    else
        echo "chromium/chromedriver not found (install them as root: apt-get install chromium chromium-driver)"
        if [ "${CI:-}" = true ]; then exit 1; fi
        echo "the browser test will be skipped"
    fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
ruff format --check .   # formatting is ruff's (pyproject.toml [tool.ruff]): `ruff format .` fixes it
python -m pytest -q "$@"
