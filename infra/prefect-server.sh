#!/usr/bin/env bash
# A Prefect API server on 127.0.0.1 (state under $CPMANT_HOME/prefect), telemetry off.
set -euo pipefail
cd "$(dirname "$0")/.."
export CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
export PREFECT_HOME=${PREFECT_HOME:-$CPMANT_HOME/prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true
exec .venv/bin/prefect server start --host 127.0.0.1 --port "${PREFECT_PORT:-4200}"
