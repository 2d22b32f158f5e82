#!/usr/bin/env bash
# PostgreSQL for the MLflow server (infra/mlflow-server.sh): a cluster of Debian's packages under $PGDATA (default
# $CPMANT_HOME/postgres) on 127.0.0.1:${PGPORT:-5433}, socket in the data dir, role and database `mlflow` (password
# `mlflow`); as root it runs as the `postgres` OS user. Idempotent: a running cluster is left as it is.
# Usage: infra/postgres.sh [start|stop|status|install]  (install: apt-get install postgresql if initdb is missing;
# CPMANT_PG_BIN names the folder of initdb/pg_ctl, default the newest /usr/lib/postgresql/*/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
CPMANT_HOME=${CPMANT_HOME:-$PWD/.cpmant}
PGDATA=${PGDATA:-$CPMANT_HOME/postgres}
PGPORT=${PGPORT:-5433}
case "$PGDATA" in /*) ;; *) PGDATA=$PWD/$PGDATA ;; esac
cmd=${1:-start}

die() { echo "postgres.sh: $*" >&2; exit 1; }

pg_bindir() {  # the folder holding initdb and pg_ctl, or nothing
  if [ -n "${CPMANT_PG_BIN:-}" ]; then
    [ -x "$CPMANT_PG_BIN/initdb" ] && echo "$CPMANT_PG_BIN"
    return 0
  fi
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && best=$d  # the glob sorts; the last is the newest (single-digit versions aside)
  done
  if [ -z "$best" ] && command -v initdb >/dev/null; then best=$(dirname "$(command -v initdb)"); fi
  [ -n "$best" ] && echo "$best"
  return 0
}

install_postgres() {
  [ -n "$(pg_bindir)" ] && return 0
  [ -n "${CPMANT_PG_BIN:-}" ] && die "CPMANT_PG_BIN=$CPMANT_PG_BIN holds no initdb"
  [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not installed; run as root: apt-get install -y postgresql"
  echo "postgres.sh: installing PostgreSQL (apt-get install -y postgresql)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q postgresql </dev/null \
    || { apt-get update -q </dev/null && apt-get install -y -q postgresql </dev/null; } \
    || die "apt-get install postgresql failed"
  [ -n "$(pg_bindir)" ] || die "postgresql is installed but no initdb was found under /usr/lib/postgresql/*/bin"
}

if [ "$cmd" = install ]; then install_postgres; echo "postgres.sh: PostgreSQL binaries in $(pg_bindir)"; exit 0; fi
case "$cmd" in start|stop|status) ;; *) die "unknown command '$cmd' (use start, stop, status or install)";; esac

[ "$cmd" = start ] && install_postgres
BIN=$(pg_bindir)
[ -n "$BIN" ] || die "PostgreSQL is not installed (no initdb); run: bash infra/postgres.sh install"

# The cluster's OS user: initdb refuses root, so root runs everything as `postgres`.
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || die "no 'postgres' OS user; install Debian's postgresql package"
  as_pg() { (cd / && runuser -u postgres -- "$@"); }
else
  as_pg() { (cd / && "$@"); }
fi
# the socket path (dir + /.s.PGSQL.PORT) must stay under 107 bytes
SOCKDIR=$PGDATA
[ ${#PGDATA} -le 80 ] || SOCKDIR=/tmp

running() { [ -f "$PGDATA/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

if [ "$cmd" = status ]; then
  if running; then echo "postgres.sh: running ($PGDATA)"; exit 0; fi
  echo "postgres.sh: not running ($PGDATA)"; exit 3
fi
if [ "$cmd" = stop ]; then
  if running; then as_pg "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null; echo "postgres.sh: stopped ($PGDATA)"
  else echo "postgres.sh: not running ($PGDATA)"; fi
  exit 0
fi

psql_su() { as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCKDIR" -p "$PGPORT" -U postgres -d postgres "$@"; }

if running; then
  echo "postgres.sh: already running ($PGDATA)"
else
  mkdir -p "$PGDATA"
  if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$PGDATA"; fi
  chmod 700 "$PGDATA"
  if ! as_pg test -r "$PGDATA" -a -w "$PGDATA" -a -x "$PGDATA"; then
    die "the 'postgres' OS user cannot reach $PGDATA (a parent folder is closed to it, e.g. mode 700);" \
        "choose another PGDATA (e.g. PGDATA=/var/tmp/cpmant-postgres) or open the parents (chmod o+x)"
  fi
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    [ -z "$(ls -A "$PGDATA")" ] || die "$PGDATA is neither empty nor a PostgreSQL data dir"
    as_pg "$BIN/initdb" -D "$PGDATA" -U postgres -E UTF8 --no-locale --auth-local=trust \
      --auth-host=scram-sha-256 >"$PGDATA.initdb.log" 2>&1 \
      || { cat "$PGDATA.initdb.log" >&2; die "initdb failed"; }
    rm -f "$PGDATA.initdb.log"
    echo "include_if_exists = 'cpmant.conf'" | as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
  fi
  # rewritten on every start, so PGPORT may change between starts
  printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = '%s'\nunix_socket_permissions = 0700\n" \
    "$PGPORT" "$SOCKDIR" | as_pg tee "$PGDATA/cpmant.conf" >/dev/null
  if ! as_pg "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 start >/dev/null; then
    tail -n 20 "$PGDATA/server.log" >&2 || true
    die "PostgreSQL did not start (port $PGPORT taken?); see $PGDATA/server.log"
  fi
  echo "postgres.sh: started ($PGDATA, 127.0.0.1:$PGPORT)"
fi

if [ "$(psql_su -tA -c "select 1 from pg_roles where rolname = 'mlflow'")" != 1 ]; then
  psql_su -c "create role mlflow login password 'mlflow'"
fi
if [ "$(psql_su -tA -c "select 1 from pg_database where datname = 'mlflow'")" != 1 ]; then
  psql_su -c "create database mlflow owner mlflow"
fi
echo "postgres.sh: database ready: postgresql://mlflow:mlflow@127.0.0.1:$PGPORT/mlflow  (stop: infra/postgres.sh stop)"
