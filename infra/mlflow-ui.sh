#!/usr/bin/env bash
# The MLflow UI over the local store under $CPMANT_HOME, on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
export MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/mlflow ui --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "sqlite:///$CPMANT_HOME/mlflow.db" --default-artifact-root "$CPMANT_HOME/mlartifacts"
