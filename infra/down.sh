#!/usr/bin/env bash
# Stop what infra/up.sh started (worker, Prefect server, MLflow server: each process group; then PostgreSQL).
# Data stays under $CPMANT_HOME.
set -uo pipefail
cd "$(dirname "$0")/.."
export CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
case "$CPMANT_HOME" in /*) ;; *) CPMANT_HOME=$PWD/$CPMANT_HOME ;; esac
RUN=$CPMANT_HOME/run
for name in worker prefect mlflow; do
  f=$RUN/$name.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "down.sh: stopped $name"
  fi
  rm -f "$f"
done
bash infra/postgres.sh stop </dev/null
