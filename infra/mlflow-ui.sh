#!/usr/bin/env bash
# The MLflow UI over the local store under $CPMANT_HOME, on 127.0.0.1:${MLFLOW_PORT:-5000}. It opens in the "Model
# training" view on the experiment `cpmant` (its runs, Models in the sidebar), with no telemetry notice: MLflow's
# app as registry/mlflow_ui.py serves it (`--app-name cpmant`). One uvicorn worker and no GenAI job runner (its huey
# consumers are 7 more processes) suit a 2-core machine. Knobs: MLFLOW_PORT, MLFLOW_WORKERS (1).
set -euo pipefail
cd "$(dirname "$0")/.."
CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
CPMANT_HOME="$CPMANT_HOME" .venv/bin/python -m cpmant_cli.env  # a copied or moved home: its locations follow it
APPS="import importlib.metadata as m, sys; sys.exit('cpmant' not in m.entry_points(group='mlflow.app').names)"
.venv/bin/python -I -c "$APPS" \
  || { echo "mlflow-ui.sh: the MLflow app 'cpmant' is not installed: run make setup" >&2; exit 1; }
echo "mlflow-ui.sh: open http://127.0.0.1:${MLFLOW_PORT:-5000}"
exec .venv/bin/mlflow server --app-name cpmant --workers "${MLFLOW_WORKERS:-1}" \
  --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "sqlite:///$CPMANT_HOME/mlflow.db" --default-artifact-root "$CPMANT_HOME/mlartifacts"
