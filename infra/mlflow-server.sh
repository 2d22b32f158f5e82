#!/usr/bin/env bash
# The MLflow tracking server (server mode) on 127.0.0.1:${MLFLOW_PORT:-5000}: runs and the registry in PostgreSQL
# (start it first: infra/postgres.sh, port ${PGPORT:-5433}, via psycopg2: SQLAlchemy 2.1 would pick psycopg 3 for a
# bare postgresql://), artifacts proxied into $CPMANT_HOME/server-artifacts, telemetry off. The UI opens in the "Model
# training" view on the experiment `cpmant`, as infra/mlflow-ui.sh's does (registry/mlflow_ui.py). Clients then use:
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:${MLFLOW_PORT:-5000}
# Knobs: MLFLOW_WORKERS (2), MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_ALLOWED_HOSTS (Host headers), MLFLOW_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
MLFLOW_BIN=${MLFLOW_BIN:-$PWD/.venv/bin/mlflow}
PORT=${MLFLOW_PORT:-5000}
PGPORT=${PGPORT:-5433}
DEST=${MLFLOW_ARTIFACTS_DESTINATION:-$CPMANT_HOME/server-artifacts}
case "$DEST" in /*) ;; *://*) ;; *) DEST=$PWD/$DEST ;; esac
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# the GenAI job runner (huey consumers: several more processes) serves nothing this project uses
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

PY=$(dirname "$MLFLOW_BIN")/python
[ ! -x "$PY" ] || "$PY" -c "import psycopg2" 2>/dev/null \
  || { echo "mlflow-server.sh: the PostgreSQL driver is missing: pip install psycopg2-binary==2.9.13" >&2; exit 1; }
case "$DEST" in *://*) ;; *) mkdir -p "$DEST" ;; esac

echo "mlflow-server.sh: serving on http://127.0.0.1:$PORT" \
  "(store postgresql+psycopg2://mlflow:***@127.0.0.1:$PGPORT/mlflow, artifacts in $DEST)"
echo "mlflow-server.sh: export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT"
exec "$MLFLOW_BIN" server --app-name cpmant --host 127.0.0.1 --port "$PORT" --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "postgresql+psycopg2://mlflow:mlflow@127.0.0.1:$PGPORT/mlflow" \
  --serve-artifacts --artifacts-destination "$DEST" --default-artifact-root mlflow-artifacts:/ \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*}"
