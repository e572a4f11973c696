#!/usr/bin/env bash
# From a fresh clone to a trained, evaluated and registered policy: installs into .venv, then runs the whole
# pipeline of configs/quickstart.yaml (tiny offline model + the bundled support-bot task, a few CPU minutes).
# Extra arguments go to `rlhf run`, e.g.  bash scripts/quickstart.sh --set dpo.max_steps=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
rlhf run configs/quickstart.yaml "$@"
cat <<'EOF'

Where to look next:
  rlhf ui                                              MLflow UI at http://127.0.0.1:5000 (experiment 'quickstart')
  rlhf lineage models:/rlhf-policy@candidate           from the registered policy back to data digests and configs
  rlhf chat models:/rlhf-policy@candidate              talk to the trained policy
  bash scripts/serve_local.sh                          the same pipeline as a Prefect deployment (docs/deployment.md)
EOF
