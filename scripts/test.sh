#!/usr/bin/env bash
# Installs everything into .venv and runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The labeling page is tested in a real headless browser: Debian's chromium + chromedriver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
            >/dev/null 2>&1 || echo "could not install chromium; the browser test will be skipped"
    else
        echo "chromium/chromedriver not found (install them as root: apt-get install chromium chromium-driver);" \
            "the browser test will be skipped"
    fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
