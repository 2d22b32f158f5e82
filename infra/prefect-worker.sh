#!/usr/bin/env bash
# A process worker for the deployments in prefect.yaml. Needs PREFECT_API_URL (e.g. http://127.0.0.1:4200/api).
set -euo pipefail
cd "$(dirname "$0")/.."
export CPMANT_REPO=${CPMANT_REPO:-$PWD}
export CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
export PREFECT_HOME=${PREFECT_HOME:-$CPMANT_HOME/prefect}
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api (start infra/prefect-server.sh first)}"
.venv/bin/prefect work-pool inspect cpmant-process >/dev/null 2>&1 \
  || .venv/bin/prefect work-pool create cpmant-process --type process
exec .venv/bin/prefect worker start --pool cpmant-process
