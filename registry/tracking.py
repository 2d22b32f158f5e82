"""Where MLflow writes: `sqlite:///$CPMANT_HOME/mlflow.db` with artifacts in `$CPMANT_HOME/mlartifacts`, unless
MLFLOW_TRACKING_URI says otherwise. Telemetry and artifact progress bars are off. An unreachable server is one clear
error. A local store is initialised (its schema created) by one process at a time, under a file lock.

A home that moves: MLflow keeps absolute locations (the experiment's artifact location, every run's artifact URI,
every model version's storage location) and relative ones are not supported by its SQLite store. So the home
records where it is (`$CPMANT_HOME/home.json`, cpmant.paths.HOME_RECORD), and `relocate_home`, run on the first
touch of the store after a copy, a move or a restore elsewhere, rewrites every stored location under the old path
to the same place under the new one (also tags and params that name home paths, e.g. the lifecycle's
`cpmant.models` tag naming the report, and the report links of Prefect's artifacts in a local Prefect database
under the home), under the store's lock, and says so in one line. A tracking server is never touched."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import sys
import urllib.error
import urllib.request
from pathlib import Path

from cpmant.errors import CpmantError
from cpmant.paths import HOME_RECORD, cpmant_home, home_record, write_home_record

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# the registry's own downloads (pull, the load cache, serving) print no tqdm bars; a user may turn them back on
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

EXPERIMENT = "cpmant"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{cpmant_home() / 'mlflow.db'}"


def artifact_root() -> str:
    return (cpmant_home() / "mlartifacts").as_uri()


def check_server(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI, ask the server's /health; raise a CpmantError that names the fix if it fails."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            problem = f"answered HTTP {r.status}"
    except (urllib.error.URLError, OSError) as e:
        problem = f"is unreachable ({getattr(e, 'reason', e)})"
    raise CpmantError(
        f"the MLflow tracking server at {uri} {problem}",
        "start it (see infra/ and the README's server mode), or unset MLFLOW_TRACKING_URI to use the local store "
        "under CPMANT_HOME",
    )


def store_lock_path(uri: str) -> Path | None:
    """The lock file that serialises initialising a local store: beside a SQLite file, else under CPMANT_HOME;
    None for a server (it initialises its own database)."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None  # a server owns its schema
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db and db != ":memory:":
            p = Path(db)
            return p.parent / f".{p.name}.init.lock"
    return cpmant_home() / ".mlflow-store.init.lock"


@contextlib.contextmanager
def store_lock(uri: str):
    """Hold an exclusive fcntl lock for the store at `uri` (a no-op for a tracking server)."""
    path = store_lock_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def setup_tracking(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store, make sure the experiment exists (artifacts under CPMANT_HOME); return its id.

    The first touch of a fresh SQLite store creates its schema (MLflow's migrations); two processes doing that at
    once fail ("table ... already exists"), so the tracking and registry stores are opened, and the experiment made,
    under a file lock: the second process finds the schema complete."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    check_server(uri)
    relocate_home()  # a copied or moved home: its stored locations follow it first
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with store_lock(uri):
        exp = mlflow.get_experiment_by_name(experiment)  # opens (and on first use creates) the tracking store
        MlflowClient().search_registered_models(max_results=1)  # the same for the registry store
        _record_home_once()
        if exp is None:
            loc = None if uri.startswith(("http://", "https://")) else f"{artifact_root()}/{experiment}"
            try:
                # experimentKind opens the experiment in the UI's "Model training" view (runs, models, registry)
                # rather than MLflow 3's default GenAI view of traces
                exp_id = mlflow.create_experiment(experiment, artifact_location=loc,
                                                  tags={"mlflow.experimentKind": "custom_model_development"})
            except Exception:  # created meanwhile by a process that shares the store but not the lock (a server)
                exp = mlflow.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# ---- a home that moves ------------------------------------------------------------------------------------------
# tables with no home paths in them, and large: left out of the rewrite
_NO_PATHS = frozenset({"metrics", "latest_metrics", "alembic_version"})
# Prefect's tables whose rows link to files under the home (the report's markdown artifact)
_PREFECT_TABLES = ("artifact", "artifact_collection")


def home_store() -> Path | None:
    """The SQLite file of the tracking store when it lies under CPMANT_HOME (the default store), else None (a
    server, or a database elsewhere: not the home's to rewrite)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    home = cpmant_home()
    return db if db.resolve().is_relative_to(home) else None


def _prefect_db(home: Path) -> Path | None:
    """Prefect's own SQLite database when the temporary server keeps it under the home ($CPMANT_HOME/prefect)."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
        return None
    db = Path(os.environ.get("PREFECT_HOME") or home / "prefect").expanduser() / "prefect.db"
    return db if db.is_file() and db.resolve().is_relative_to(home) else None


def _recorded_home(db: Path, home: Path) -> Path | None:
    """Where the home was: home.json's path, else (a home made before home.json) the folder that holds the
    `mlartifacts` of its experiments' artifact locations; None when nothing says."""
    rec = home_record(home).get("path")
    if rec:
        return Path(rec)
    from urllib.parse import unquote, urlparse

    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        try:
            locs = [r[0] for r in con.execute("SELECT artifact_location FROM experiments")]
        except sqlite3.Error:  # not (yet) an MLflow store
            return None
    for loc in locs:
        if loc and loc.startswith("file://") and "/mlartifacts" in loc:
            return Path(unquote(urlparse(loc).path).split("/mlartifacts", 1)[0])
    return None


def _mover(old: Path, new: Path):
    """str -> str replacing old's path (plain or as a file:// URI) by new's wherever it is a whole path prefix."""
    forms = {old.as_uri(): new.as_uri(), str(old): str(new)}
    # the URI form first (it contains the plain one); a match must end the path or continue it with "/", so
    # /a/home never rewrites /a/home2 or /a/home-copy
    pat = re.compile("(" + "|".join(re.escape(f) for f in forms) + r")(?![\w.\-~])")
    return lambda v: pat.sub(lambda m: forms[m.group(1)], v) if isinstance(v, str) else v


def rewrite_paths(db: Path, old: Path, new: Path, tables: tuple[str, ...] | None = None) -> int:
    """Rewrite old -> new in every text column of `tables` (default: every table but _NO_PATHS) of the SQLite
    file `db`, in one transaction; return how many values changed."""
    move = _mover(old, new)
    needles = {str(old), old.as_uri()[len("file://"):]}
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=60, isolation_level=None)) as con:
        con.create_function("cpmant_move", 1, move, deterministic=True)
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        con.execute("BEGIN IMMEDIATE")
        try:
            for t in names:
                if t.startswith("sqlite_") or t in _NO_PATHS or (tables is not None and t not in tables):
                    continue
                for _, col, typ, *_ in con.execute(f'PRAGMA table_info("{t}")').fetchall():
                    if typ and not any(k in typ.upper() for k in ("CHAR", "TEXT", "CLOB", "JSON")):
                        continue
                    where = " OR ".join(f'instr("{col}", ?) > 0' for _ in needles)
                    cur = con.execute(f'UPDATE "{t}" SET "{col}" = cpmant_move("{col}") '
                                      f'WHERE ({where}) AND cpmant_move("{col}") != "{col}"', tuple(needles))
                    changed += max(cur.rowcount, 0)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return changed


def relocate_home() -> str | None:
    """When the home's store records another path than CPMANT_HOME's (the home was copied, moved or restored on
    another machine), rewrite the old path to the new one in the home's MLflow store (and Prefect's local database),
    under the store's lock; print and return the line that says so. None when the home did not move, or the store
    is not the home's (MLFLOW_TRACKING_URI names a server or another database)."""
    db = home_store()
    home = cpmant_home()
    if db is None or not db.is_file() or home_record(home).get("path") == str(home):
        return None  # the usual case: one small read
    with store_lock(tracking_uri()):
        old = _recorded_home(db, home)  # read again under the lock: another process may have done it
        rec = home_record(home)
        if old is None or old == home:
            write_home_record(home, rec.get("previous"))
            return None
        n = rewrite_paths(db, old, home)
        pdb = _prefect_db(home)
        if pdb is not None:
            n += rewrite_paths(pdb, old, home, _PREFECT_TABLES)
        write_home_record(home, [*(p for p in rec.get("previous") or [] if p != str(home)), str(old)])
    line = f"home moved from {old} to {home}: {n} locations rewritten"
    print(line, file=sys.stderr)
    return line


def _record_home_once() -> None:
    """A new home store: record where the home is (called under the store's lock, the store just opened)."""
    db = home_store()
    if db is not None and db.is_file() and not (cpmant_home() / HOME_RECORD).is_file():
        write_home_record(cpmant_home())
