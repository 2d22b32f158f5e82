"""Where MLflow writes: `sqlite:///$CPMANT_HOME/mlflow.db` with artifacts in `$CPMANT_HOME/mlartifacts`, unless
MLFLOW_TRACKING_URI says otherwise. Telemetry and artifact progress bars are off. An unreachable server is one clear
error. A local store is initialised (its schema created) by one process at a time, under a file lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import urllib.error
import urllib.request
from pathlib import Path

from cpmant.errors import CpmantError
from cpmant.paths import cpmant_home

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
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with store_lock(uri):
        exp = mlflow.get_experiment_by_name(experiment)  # opens (and on first use creates) the tracking store
        MlflowClient().search_registered_models(max_results=1)  # the same for the registry store
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
