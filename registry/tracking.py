"""Where MLflow writes: `sqlite:///$CPMANT_HOME/mlflow.db` with artifacts in `$CPMANT_HOME/mlartifacts`, unless
MLFLOW_TRACKING_URI says otherwise. Telemetry is off. An unreachable server is one clear error."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from cpmant.errors import CpmantError
from cpmant.paths import cpmant_home

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

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


def setup_tracking(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the store, make sure the experiment exists (artifacts under CPMANT_HOME); return its id."""
    import mlflow

    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        loc = None if uri.startswith(("http://", "https://")) else f"{artifact_root()}/{experiment}"
        try:
            exp_id = mlflow.create_experiment(experiment, artifact_location=loc)
        except Exception:  # created meanwhile by a concurrent process
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
