#!/usr/bin/env bash
# Serves the pipeline on this machine, all on 127.0.0.1: a Prefect server, an MLflow server and a process worker;
# then deploys prefect.yaml and triggers one quickstart run. The long form of each step is docs/deployment.md.
#
#   bash scripts/serve_local.sh          # start (or reuse) the servers and the worker, deploy, trigger a run
#   bash scripts/serve_local.sh stop     # stop what `start` started
#
# Ports: PREFECT_PORT (default 4200) and MLFLOW_PORT (default 5000). DEPLOYMENT (default quickstart) is the
# deployment triggered; TRIGGER=0 skips the trigger. Logs and pid files: runs/serve/.
#
# The Prefect API can run any deployment with any parameters (docs/deployment.md, "Securing a shared server"),
# so the server requires a login (PREFECT_SERVER_API_AUTH_STRING, generated once into runs/serve/prefect_auth,
# mode 0600, and printed once; the UI asks for it), checks CSRF tokens and accepts browser calls only from
# its own origin. Clients (this script, the worker, `prefect` in another shell) send PREFECT_API_AUTH_STRING.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate

STATE=runs/serve
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
DEPLOYMENT=${DEPLOYMENT:-quickstart}
POOL=rlhf-pool
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p "$STATE"

AUTH_FILE=$STATE/prefect_auth
if [ "${1:-start}" != "stop" ] && [ ! -s "$AUTH_FILE" ]; then
  (umask 077 && python -c "import secrets; print('admin:' + secrets.token_urlsafe(32))" >"$AUTH_FILE")
  echo "Prefect login (user:password), shown once, kept in $AUTH_FILE: $(cat "$AUTH_FILE")"
fi
[ -f "$AUTH_FILE" ] && chmod 600 "$AUTH_FILE"

stop() {
  # Each service runs in its own session (setsid), so its pid is its process-group id: stop the whole group.
  for name in worker prefect mlflow; do
    pidfile="$STATE/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      echo "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
  done
}

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start_bg() {  # start_bg NAME COMMAND...: run in its own session, log to runs/serve/NAME.log
  local name=$1; shift
  if running "$name"; then echo "$name already running (pid $(cat "$STATE/$name.pid"))"; return; fi
  setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}

wait_http() {  # wait_http NAME URL: until URL answers 200, or fail with the service's log
  for _ in $(seq 1 120); do
    curl -sf "$2" >/dev/null && return 0
    running "$1" || break
    sleep 1
  done
  echo "error: $1 did not come up at $2; last lines of $STATE/$1.log:" >&2
  tail -n 30 "$STATE/$1.log" >&2
  exit 1
}

if [ "${1:-start}" = "stop" ]; then stop; exit 0; fi

# 1. Prefect server (UI + API); its database lives in PREFECT_HOME (default ~/.prefect). The secret travels in
#    the environment, not on a command line that `ps` shows to every user.
PREFECT_AUTH=$(cat "$AUTH_FILE")
export PREFECT_API_AUTH_STRING=$PREFECT_AUTH
(
  export PREFECT_SERVER_API_AUTH_STRING=$PREFECT_AUTH
  export PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED=true
  export PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS="http://127.0.0.1:${PREFECT_PORT}"
  start_bg prefect prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
)
# 2. MLflow server on the pipeline's default store, so runs logged before (and `rlhf run` runs) show up too.
start_bg mlflow mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri sqlite:///runs/mlflow.db --artifacts-destination runs/mlartifacts
wait_http prefect "$PREFECT_API_URL/health"
wait_http mlflow "http://127.0.0.1:${MLFLOW_PORT}/health"

# 3. The process work pool (once per server) and the deployments of prefect.yaml (from this checkout).
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
PWD=$(pwd) prefect --no-prompt deploy --all

# 4. A worker that runs the pool's flow runs as subprocesses of this checkout. The pipeline writes the local
#    store directly; RLHF_MLFLOW_UI_URL makes the MLflow links it logs open the server of step 2.
RLHF_MLFLOW_UI_URL="http://127.0.0.1:${MLFLOW_PORT}" start_bg worker prefect worker start --pool "$POOL" --type process
sleep 3
running worker || { echo "error: the worker exited:" >&2; tail -n 30 "$STATE/worker.log" >&2; exit 1; }

# 5. One run of the chosen deployment.
if [ "${TRIGGER:-1}" = "1" ]; then
  prefect deployment run "rlhf-pipeline/$DEPLOYMENT"
fi

cat <<EOF

Prefect UI   http://127.0.0.1:${PREFECT_PORT}        (flow runs, one task run per stage, MLflow links)
MLflow UI    http://127.0.0.1:${MLFLOW_PORT}        (the config's experiment: pipeline run + stage runs; Models: rlhf-policy)
Logs         $STATE/{prefect,mlflow,worker}.log
Prefect login           in $AUTH_FILE (user:password; the UI asks for it once per browser)
In another shell first:  export PREFECT_API_URL=$PREFECT_API_URL PREFECT_API_AUTH_STRING="\$(cat $AUTH_FILE)"
Trigger again:           prefect deployment run 'rlhf-pipeline/$DEPLOYMENT'
Stop everything:         bash scripts/serve_local.sh stop
EOF
