#!/usr/bin/env bash
# A Prefect API server on 127.0.0.1 (state under $CPMANT_HOME/prefect), telemetry off.
set -euo pipefail
cd "$(dirname "$0")/.."
export CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
export PREFECT_HOME=${PREFECT_HOME:-$CPMANT_HOME/prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true
PORT=${PREFECT_PORT:-4200}
# the UI calls the API at PREFECT_UI_API_URL (default 127.0.0.1:4200): on another port it must be told where
export PREFECT_UI_API_URL=${PREFECT_UI_API_URL:-http://127.0.0.1:$PORT/api}
exec .venv/bin/prefect server start --host 127.0.0.1 --port "$PORT"
