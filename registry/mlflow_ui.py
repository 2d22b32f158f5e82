"""The MLflow UI as this project serves it (infra/mlflow-ui.sh and the server mode, infra/mlflow-server.sh):
MLflow's own server app, registered as the MLflow server app `cpmant` (the `mlflow.app` entry point in
pyproject.toml, MLflow's plugin mechanism for server apps: `mlflow server --app-name cpmant`), with one change: its
index page sets the UI's defaults before the UI starts.

MLflow 3.17's UI keeps its view choices in the browser's localStorage and has no server option for them: the
workflow type (`mlflow.workflowType_v1`, default GenAI: a traces overview, an "Evaluation runs" list, no registry in
the sidebar), the telemetry notice (`mlflow.telemetry.info.alert.dismissed_v1`, shown on the home page whatever the
server's MLFLOW_DISABLE_TELEMETRY says), the UI's own telemetry switch (`mlflow.settings.telemetry.enabled_v1`), the
assistant panel that opens itself on the first visit (`mlflow.assistant.fab.autoOpenedOnFirstLoad_v1`) and the
GenAI overview's popup (`mlflow.detectIssues.guidanceShown_v1`). The page sets the workflow type to "Model
training" (machine_learning) when the browser has no choice of its own (the toggle still works and is remembered),
turns the UI's telemetry off and closes the notice, the assistant's first-visit panel and the popup. The bare root
URL lands on the project's experiment (MLFLOW_UI_EXPERIMENT, default `cpmant`):
`#/experiments/<id>?workflowType=machine_learning`, its runs, with Models (the registry) in the sidebar. A deep
link keeps its own page, now in the Model training view; `?workflowType=genai` in a link still wins."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flask import Response
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import app  # what uvicorn serves: MLflow's FastAPI app around the Flask one

__all__ = ["app", "index_html", "landing_script"]

# localStorage keys of MLflow 3.17's UI (its useLocalStorage hook stores `${key}_v${version}` as JSON), read from
# the JS bundle under mlflow/server/js/build: a newer MLflow that renames them only loses these defaults
DEFAULTS = {"mlflow.workflowType_v1": "machine_learning",
            "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
            "mlflow.detectIssues.guidanceShown_v1": True}  # the GenAI overview's "Detect Issues" popup
FORCED = {"mlflow.telemetry.info.alert.dismissed_v1": True,
          "mlflow.settings.telemetry.enabled_v1": False}


def landing_script(experiment_id: str | None) -> str:
    """The script the index page runs before the UI: localStorage defaults, and the root URL sent to the
    experiment's runs in the Model training view (no redirect when there is no experiment yet)."""
    target = (f"#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else "")
    return ("<script>(function(){try{var s=window.localStorage,d=%s,f=%s,k;"
            "for(k in d){if(s.getItem(k)===null)s.setItem(k,JSON.stringify(d[k]));}"
            "for(k in f){s.setItem(k,JSON.stringify(f[k]));}}catch(e){}"
            "var t=%s,h=window.location.hash;if(t&&(h===''||h==='#'||h==='#/'))window.location.replace(t);"
            "})();</script>" % (json.dumps(DEFAULTS), json.dumps(FORCED), json.dumps(target)))


def _experiment_id() -> str | None:
    """The id of the project's experiment in the server's store, or None (none yet, or the store unreadable)."""
    from mlflow.server.handlers import _get_tracking_store

    try:
        exp = _get_tracking_store().get_experiment_by_name(os.environ.get("MLFLOW_UI_EXPERIMENT", "cpmant"))
    except Exception:  # the UI still opens (on MLflow's home page) when the store cannot say
        return None
    return exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None


def index_html() -> str:
    """MLflow's index.html with the landing script first in <head>."""
    page = (Path(flask_app.static_folder) / "index.html").read_text(encoding="utf-8")
    return page.replace("<head>", "<head>" + landing_script(_experiment_id()), 1)


def _serve() -> Response:
    return Response(index_html(), mimetype="text/html", headers={"Cache-Control": "no-cache"})


flask_app.view_functions["serve"] = _serve  # MLflow's route for the index page ("/" under any static prefix)
