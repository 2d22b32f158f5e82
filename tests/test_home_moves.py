"""A home that moves: a CPMANT_HOME copied to another path, its original deleted, still pulls, loads through MLflow's
pyfunc, lists every run's artifacts, writes the report and tunes (new runs, a new version), all under the new home
(the stored locations are rewritten by the first command, registry.tracking.relocate_home); nothing is written to
the old path; a home copied without its artifacts names the missing files. Also the rewrite itself on bare SQLite
tables (whole path prefixes only, Prefect's artifact links), and a tracking server or another store left alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from _serving import serve_and_ask
from conftest import FIXTURES, registered_micro_model
from test_registry_server import free_port

pytestmark = pytest.mark.flow
# a LoRA tuning of a few examples: the new runs' locations are under test, not the scores
TUNE = ["tune.epochs=1", "tune.max_train_examples=8", "tune.max_eval_examples=4", "tune.batch_size=4",
        "tune.patience=0", "tracking.measure_power_secs=1"]


def _old_home(old: Path) -> dict:
    """A micro model registered in `old`, a report written there (a `report` run with its page), and the report's
    path in a run tag and a param (a path under the home, as runs record their config paths)."""
    import mlflow

    from cpmant_cli.main import main
    from flows.summary import summary_row
    from tasks.config import TrackingConfig
    from tasks.lifecycle import close_run, open_run

    mp, model_dir, reg = registered_micro_model(old, FIXTURES / "corpus", max_steps=2, warmup_steps=1)
    try:
        assert main(["report"]) == 0
        report = old / "reports" / "report.html"
        assert report.is_file()
        stage_run = open_run(TrackingConfig(), "report")
        close_run(TrackingConfig(), stage_run, [summary_row("report", str(report), "sections", 6, 1.0, False)])
        client = mlflow.MlflowClient()
        client.set_tag(stage_run, "report_path", str(report))
        client.log_param(stage_run, "report_path", str(report))
    finally:
        mp.undo()
        mlflow.set_tracking_uri(None)
    return {"model_dir": model_dir, "reg": reg, "stage_run": stage_run}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_copied_home_works_from_the_copy_with_the_original_deleted(tmp_path, monkeypatch, capsys,
                                                                      prefect_harness):
    import mlflow
    from mlflow.tracking import MlflowClient

    from cpmant.paths import rehome
    from cpmant_cli.main import main
    from registry.tracking import setup_tracking

    old, new = tmp_path / "old-home", tmp_path / "new-home"
    made = _old_home(old)
    shutil.copytree(old, new)
    shutil.rmtree(old)
    capsys.readouterr()
    monkeypatch.setenv("CPMANT_HOME", str(new))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        # pull: the first command rewrites the locations and says so in one line
        assert main(["pull", "models:/cpm-ant-tiny/1", "--to", str(tmp_path / "pulled")]) == 0
        err = capsys.readouterr().err
        m = re.search(rf"home moved from {re.escape(str(old))} to {re.escape(str(new))}: (\d+) locations rewritten",
                      err)
        assert m and int(m.group(1)) >= 4, err  # experiment, run, logged model, version (and the tag)
        assert _files(tmp_path / "pulled") == _files(new / "run" / "model")

        # MLflow itself resolves the version, the runs and their artifacts under the new home
        setup_tracking()
        client = MlflowClient()
        exp = mlflow.get_experiment_by_name("cpmant")
        assert exp.artifact_location == (new / "mlartifacts" / "cpmant").as_uri()
        assert client.get_model_version_download_uri("cpm-ant-tiny", "1").startswith(new.as_uri() + "/")
        model = mlflow.pyfunc.load_model("models:/cpm-ant-tiny/1")
        out = model.predict(["床前明月光"], params={"max_new_tokens": 2})
        assert len(out) == 1 and isinstance(out[0], str)
        runs = client.search_runs([exp.experiment_id])
        assert runs and all(r.info.artifact_uri.startswith(new.as_uri() + "/") for r in runs)
        report_runs = [r for r in runs if r.info.run_name == "report" and r.info.run_id != made["stage_run"]]
        assert "report" in {a.path for a in client.list_artifacts(report_runs[0].info.run_id)}  # the page
        version_files = mlflow.artifacts.list_artifacts(
            artifact_uri=client.get_model_version_download_uri("cpm-ant-tiny", "1"))
        assert "MLmodel" in {Path(a.path).name for a in version_files}  # the version's logged model
        # the report's path in a run's tag and param follows the home
        data = client.get_run(made["stage_run"]).data
        assert data.tags["report_path"] == data.params["report_path"] == str(new / "reports" / "report.html")

        # `cpmant serve` from the copy (the console script, a new process): it answers the README's request
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        port = free_port()
        rc, answer = serve_and_ask(["models:/cpm-ant-tiny/1", "--port", str(port)], {**env, "CPMANT_HOME": str(new)},
                                   port, {"inputs": ["床前明月光"], "params": {"max_new_tokens": 2}}, timeout=180)
        assert rc == 0, answer

        # the report again, and new tracked runs (a micro LoRA tuning, registered): written into the new home
        assert main(["report", "--json"]) == 0
        assert (new / "reports" / "report.html").is_file()
        capsys.readouterr()
        assert main(["tune", "models:/cpm-ant-tiny/1", "--task", "demo-ccpm", "--method", "lora", "--data",
                     str(FIXTURES / "corpus"), "--json", "--set", *TUNE]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["deltas"] == ["models:/cpm-ant-tiny-demo-ccpm-lora/1"]
        setup_tracking()
        delta = client.get_model_version("cpm-ant-tiny-demo-ccpm-lora", "1")
        assert client.get_model_version_download_uri(delta.name, "1").startswith(new.as_uri() + "/mlartifacts/")
        assert client.get_run(delta.run_id).info.artifact_uri.startswith(new.as_uri() + "/mlartifacts/")
        # a path the old home recorded (a corpus there, say) is found in the new one
        assert rehome(old / "run" / "model") == new / "run" / "model"
        # a second command finds nothing more to rewrite
        assert main(["lineage", "models:/cpm-ant-tiny/1"]) == 0
        assert "home moved" not in capsys.readouterr().err
        # a home copied without its artifacts: the missing files are named, not "not a cpmant model folder"
        shutil.rmtree(new / "mlartifacts")
        shutil.rmtree(new / "cache" / "models", ignore_errors=True)  # (none yet: pull downloads afresh)
        assert main(["generate", "models:/cpm-ant-tiny/1", "床前", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: the files of models:/cpm-ant-tiny/1 are missing: nothing at "
                              f"{new.as_uri()}/mlartifacts/cpmant/models/"), err
        assert "\nfix: restore them there" in err
    finally:
        mlflow.set_tracking_uri(None)
    assert not old.exists()  # nothing wrote to the old path


def test_rewrite_replaces_whole_path_prefixes_only(tmp_path):
    from registry.tracking import rewrite_paths

    old, new = Path("/data/home"), Path("/srv/moved home")
    db = tmp_path / "t.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE artifact (id INTEGER PRIMARY KEY, data TEXT, n INTEGER)")
        con.executemany("INSERT INTO artifact (data, n) VALUES (?, ?)", [
            ("file:///data/home/mlartifacts/0", 1), ('"[report](/data/home/reports/r.html)"', 2),
            ("/data/home", 3), ("/data/home2/x, /data/home-copy, /data/homework", 4), ("models:/m-1", 5)])
    assert rewrite_paths(db, old, new) == 3
    with sqlite3.connect(db) as con:
        rows = [r[0] for r in con.execute("SELECT data FROM artifact ORDER BY n")]
    assert rows == ["file:///srv/moved%20home/mlartifacts/0", '"[report](/srv/moved home/reports/r.html)"',
                    "/srv/moved home", "/data/home2/x, /data/home-copy, /data/homework", "models:/m-1"]


def test_a_tracking_server_or_a_store_elsewhere_is_left_alone(tmp_path, monkeypatch):
    import json

    from registry.tracking import home_store, relocate_home

    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").write_bytes(b"")
    (home / "home.json").write_text(json.dumps({"path": "/somewhere/else", "previous": []}))
    monkeypatch.setenv("CPMANT_HOME", str(home))
    for uri in ("http://127.0.0.1:9", f"sqlite:///{tmp_path / 'other.db'}"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert home_store() is None and relocate_home() is None
    assert json.loads((home / "home.json").read_text())["path"] == "/somewhere/else"  # untouched


def test_relocate_rewrites_the_store_and_prefects_artifacts_once(tmp_path, monkeypatch, capsys):
    """On SQLite files shaped like the stores' tables: MLflow's run tags and Prefect's artifact links follow the
    home; home.json then records the new place and the old one; a second call finds nothing to do."""
    import json

    from cpmant.paths import home_record
    from registry.tracking import relocate_home

    old, home = Path("/gone/home"), tmp_path / "home"
    (home / "prefect").mkdir(parents=True)
    with sqlite3.connect(home / "mlflow.db") as con:
        con.execute("CREATE TABLE tags (key VARCHAR(250), value VARCHAR(8000))")
        con.execute("INSERT INTO tags VALUES ('cpmant.models', 'models:/a/1, /gone/home/reports/report.html')")
    with sqlite3.connect(home / "prefect" / "prefect.db") as con:
        con.execute("CREATE TABLE artifact (id CHAR(36), data JSON)")
        con.execute("CREATE TABLE flow_run (id CHAR(36), parameters JSON)")  # not a link: left as it ran
        con.execute("INSERT INTO artifact VALUES ('a', ?)", (json.dumps("[report](/gone/home/reports/r.html)"),))
        con.execute("INSERT INTO flow_run VALUES ('f', ?)", (json.dumps({"out": "/gone/home/x"}),))
    (home / "home.json").write_text(json.dumps({"path": str(old), "previous": []}))
    monkeypatch.setenv("CPMANT_HOME", str(home))
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(k, raising=False)

    assert relocate_home() == f"home moved from {old} to {home}: 2 locations rewritten"
    assert capsys.readouterr().err == f"home moved from {old} to {home}: 2 locations rewritten\n"
    with sqlite3.connect(home / "mlflow.db") as con:
        assert con.execute("SELECT value FROM tags").fetchone()[0] == f"models:/a/1, {home}/reports/report.html"
    with sqlite3.connect(home / "prefect" / "prefect.db") as con:
        assert json.loads(con.execute("SELECT data FROM artifact").fetchone()[0]) == \
            f"[report]({home}/reports/r.html)"
        assert json.loads(con.execute("SELECT parameters FROM flow_run").fetchone()[0]) == {"out": "/gone/home/x"}
    assert home_record(home) == {"path": str(home), "previous": [str(old)]}
    assert relocate_home() is None and capsys.readouterr().err == ""
