#!/usr/bin/env bash
# Everything the deployments need, on 127.0.0.1, in one command: PostgreSQL (infra/postgres.sh), the MLflow server
# on it (infra/mlflow-server.sh), the Prefect server (its own SQLite under $PREFECT_HOME), the process work pool
# `cpmant-process` with its queues and limits, the deployments of prefect.yaml, and a worker. Idempotent: what is
# running is left as it is. State and logs under $CPMANT_HOME (default ./.cpmant): logs/*.log, run/*.pid.
#
# The pool exists before anything deploys; the limits keep one training at a time:
#   queue `training` (pretrain, compress, tune, lifecycle) with concurrency limit 1, queue `default` (validate,
#   report) unlimited, and the task tag `cpmant-training` (the pretrain task) limited to 1 across all flow runs.
#
# Knobs: MLFLOW_PORT (5000), PREFECT_PORT (4200), PGPORT (5433), CPMANT_DEPLOY (1: every deployment of prefect.yaml
#        whose flow file exists; a comma list: those; 0: none),
#        CPMANT_WORKER (1: start a worker), PREFECT_WORKER_QUERY_SECONDS (5), UP_TIMEOUT (120 s per server).
# Then:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 PREFECT_API_URL=http://127.0.0.1:4200/api
# Stop:  bash infra/down.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CPMANT_REPO=${CPMANT_REPO:-$PWD}
export CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
case "$CPMANT_HOME" in /*) ;; *) CPMANT_HOME=$PWD/$CPMANT_HOME ;; esac
export PREFECT_HOME=${PREFECT_HOME:-$CPMANT_HOME/prefect}
export MLFLOW_PORT=${MLFLOW_PORT:-5000} PREFECT_PORT=${PREFECT_PORT:-4200} PGPORT=${PGPORT:-5433}
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-5}
PREFECT=${PREFECT_BIN:-$PWD/.venv/bin/prefect}
LOGS=$CPMANT_HOME/logs RUN=$CPMANT_HOME/run
mkdir -p "$LOGS" "$RUN" "$PREFECT_HOME"

say() { echo "up.sh: $*"; }
alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
PY=$(dirname "$PREFECT")/python
healthy() { "$PY" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}
# launch NAME URL CMD...: start it in its own session (down.sh stops the whole group) unless it answers already;
# wait_up NAME URL: wait for its health URL. Both servers start together, then both are waited for.
launch() {
  local name=$1 url=$2; shift 2
  if alive "$name" && healthy "$url"; then say "$name already running"; return 0; fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}
wait_up() {
  local name=$1 url=$2 deadline=$((SECONDS + ${UP_TIMEOUT:-120}))
  until healthy "$url"; do
    if ! alive "$name"; then tail -n 30 "$LOGS/$name.log" >&2; say "$name exited; see $LOGS/$name.log"; exit 1; fi
    if [ $SECONDS -gt $deadline ]; then say "$name did not answer $url in ${UP_TIMEOUT:-120} s"; exit 1; fi
    sleep 0.5
  done
  say "$name up ($url)"
}

launch prefect "$PREFECT_API_URL/health" bash infra/prefect-server.sh  # needs no PostgreSQL: start it first
bash infra/postgres.sh start </dev/null
launch mlflow "$MLFLOW_TRACKING_URI/health" bash infra/mlflow-server.sh
wait_up mlflow "$MLFLOW_TRACKING_URI/health"
wait_up prefect "$PREFECT_API_URL/health"

# the pool, its queues and the training limits, before anything deploys (one client process: each `prefect` CLI
# call costs seconds of imports)
"$PY" - <<'PY'
import asyncio

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


async def main():
    async with get_client() as c:
        try:
            await c.read_work_pool("cpmant-process")
        except ObjectNotFound:
            await c.create_work_pool(WorkPoolCreate(name="cpmant-process", type="process"))
        for name, limit in (("training", 1), ("default", None)):
            try:
                q = await c.read_work_queue_by_name(name, work_pool_name="cpmant-process")
            except ObjectNotFound:
                q = await c.create_work_queue(name=name, work_pool_name="cpmant-process")
            await c.update_work_queue(q.id, concurrency_limit=limit)
        try:
            await c.create_concurrency_limit(tag="cpmant-training", concurrency_limit=1)
        except ObjectAlreadyExists:
            pass


asyncio.run(main())
PY
say "work pool cpmant-process: queue training (limit 1), queue default; task tag cpmant-training limited to 1"

if [ "${CPMANT_WORKER:-1}" = 1 ]; then
  if alive worker; then say "worker already running"; else
    setsid "$PREFECT" worker start --pool cpmant-process --type process >"$LOGS/worker.log" 2>&1 </dev/null &
    echo $! >"$RUN/worker.pid"
    say "worker started (log $LOGS/worker.log)"
  fi
fi
if [ "${CPMANT_DEPLOY:-1}" != 0 ]; then
  # the deployments of prefect.yaml whose flow file exists (CPMANT_DEPLOY=1), or those named (CPMANT_DEPLOY=a,b)
  names=$("$PY" - "${CPMANT_DEPLOY:-1}" <<'PY'
import os, sys, yaml
want = sys.argv[1]
deps = yaml.safe_load(open("prefect.yaml"))["deployments"]
names = [d["name"] for d in deps if os.path.exists(d["entrypoint"].split(":")[0])
         and (want == "1" or d["name"] in want.split(","))]
print(" ".join(f"-n {n}" for n in names))
PY
)
  # shellcheck disable=SC2086
  "$PREFECT" --no-prompt deploy $names >"$LOGS/deploy.log" 2>&1 \
    || { tail -n 30 "$LOGS/deploy.log" >&2; say "prefect deploy failed; see $LOGS/deploy.log"; exit 1; }
  say "deployed: $(grep -o "Deployment '[^']*'" "$LOGS/deploy.log" | sort -u | tr '\n' ' ')"
fi
echo "export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI PREFECT_API_URL=$PREFECT_API_URL CPMANT_HOME=$CPMANT_HOME"
