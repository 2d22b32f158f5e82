"""`cpmant report` on a micro lifecycle (a micro pretrain and one compression rung): one self-contained HTML page
with every section (those not run yet say so), logged as an artifact of a `report` run and as a Prefect markdown
artifact; the figures on the page are the ones MLflow holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from _micro_lifecycle import build

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def lifecycle(prefect_harness):
    return build()


@pytest.fixture(scope="module")
def report(lifecycle, tmp_path_factory):
    import mlflow

    from flows.report import report_flow

    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(lifecycle["home"]))
    out = tmp_path_factory.mktemp("report") / "report.html"
    res = report_flow(lifecycle["config"], str(out))
    yield {**res, "html": out.read_text(encoding="utf-8"), "lifecycle": lifecycle}
    mp.undo()
    mlflow.set_tracking_uri(None)


def test_the_page_is_self_contained_and_has_every_section(report):
    page = report["html"]
    assert Path(report["path"]).is_file()
    # self-contained: no external URL is loaded (no src/href to http(s)), plots are inline PNGs
    assert not re.search(r'(src|href)="https?://', page)
    assert "<link" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 4  # loss curves, ladder, per-stage costs, projection
    import base64

    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for title in ("Loss curves", "Size ladder beside CPM-Ant's published ladder", "Delta tuning against full fine",
                  "Validation gates and decisions", "Energy, emissions and cost per stage",
                  "Lineage from corpus to deltas", "Projection of a full 10B pretraining run"):
        assert title in page, title
    assert report["sections"] == {"loss_curves": True, "ladder": True, "deltas": False, "validation": False,
                                  "lineage": True, "projection": True}
    assert "delta tuning: not run yet" in page and "validation: not run yet" in page


def test_the_figures_are_mlflows(report):
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    lc = report["lifecycle"]
    page = report["html"]
    pre_run = lc["pretrain"]["run_id"]
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(lc["home"]))
    try:
        setup_tracking()
        client = MlflowClient()
        hist = sorted(client.get_metric_history(pre_run, "loss"), key=lambda m: m.step)
        assert len(hist) == 8
        # the loss table: first and last loss as MLflow holds them (4 significant digits)
        assert f"<td class=\"\">{hist[0].value:.4g}</td><td class=\"\">{hist[-1].value:.4g}</td>" in page
        # the ladder: our 3b rung and CPM-Ant's published 3B loss (2.603) in a labelled column
        assert "models:/cpm-ant-tiny-3b/1" in page and "published LM loss (CPM-Ant)" in page and "2.603" in page
        # lineage: corpus -> base -> variant, with the data hash of the base version
        base = client.get_model_version("cpm-ant-tiny", "1")
        assert (f"corpus data:{base.tags['cpmant.data_sha256'][:16]} &rarr; <code>models:/cpm-ant-tiny/1</code>"
                in page)
        assert "&rarr; <code>models:/cpm-ant-tiny-3b/1</code>" in page
        # the measured input of the projection is the pretraining run's throughput
        tps = client.get_run(pre_run).data.metrics["tokens_per_second"]
        assert report["measured"]["run_id"] == pre_run and report["measured"]["tokens_per_second"] == tps
        # the report run: the page and the projection as artifacts, published figures as params, no metrics
        run = client.get_run(report["run_id"])
        assert run.data.tags["cpmant.stage"] == "report" and run.info.run_name == "report"
        assert run.data.metrics == {}
        assert run.data.params["published.cpm_ant_cost_rmb"] == "430000.0"
        arts = {a.path for a in client.list_artifacts(report["run_id"], "report")}
        assert arts == {"report/report.html"}
        assert "projection.json" in {a.path for a in client.list_artifacts(report["run_id"])}
    finally:
        mp.undo()


def test_the_projection_and_both_emission_readings_are_on_the_page(report):
    page = report["html"]
    check = report["projection"][0]
    assert check["label"] == "CPM-Ant's own figures" and abs(check["cost_rmb"] / 430e3 - 1) < 0.25
    assert "0.178 kWh per A100-hour" in page and "under half of it" in page
    assert "4,872" in page and "46,700" in page and "430,000" in page
    for name in ("A100", "H100", "H200"):
        assert f"{name}, published utilisation" in page and f"{name}, our measured MFU" in page
    assert "this machine, measured" in page
    assert "NVIDIA H200 datasheet" in page and "Uptime Institute" in page  # each figure names its source


def test_prefect_markdown_artifact(report):
    from prefect.artifacts import Artifact

    art = Artifact.get("lifecycle-report")
    assert art is not None and art.type == "markdown"
    assert report["path"] in art.data and "CPM-Ant published" in art.data


def test_cli_rerun_of_an_unknown_run_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import mlflow

    from cpmant_cli.main import main

    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    try:
        assert main(["rerun", "no-such-run", "--home", str(tmp_path / "new")]) == 2
    finally:
        mlflow.set_tracking_uri(None)
    err = capsys.readouterr().err
    assert err.startswith("error: no run 'no-such-run' in the tracking store") and "\nfix: " in err
    assert not (tmp_path / "new").exists()  # nothing made before the run was found


def test_sections_appear_as_their_stages_land(mlflow_store):
    """An empty store gives a page of "not run yet" sections beside the published projection; a tune stage's
    comparison table and a validation run's gates appear once logged."""
    import mlflow

    from tasks.report import build_report

    try:
        path, data, page = build_report(out=mlflow_store / "empty.html")
        assert page.count("not run yet") >= 5 and "CPM-Ant's own figures" in page
        assert data["measured"] is None and len(data["projection"]) == 4
        with mlflow.start_run(run_name="compare-demo_cls", tags={"cpmant.stage": "delta", "cpmant.task": "demo_cls"}):
            mlflow.log_table({"task": ["demo_cls"] * 2, "method": ["lora", "full"], "score": [0.625, 0.75],
                              "vs_full": [0.8333, 1.0], "trainable_params": [16384, 1200000]},
                             "comparison-demo_cls.json")
        with mlflow.start_run(run_name="validate-cpm-ant-tiny", tags={"cpmant.stage": "validate",
                                                                      "cpmant.gate.perplexity": "pass",
                                                                      "cpmant.decision": "champion"}):
            mlflow.log_metrics({"perplexity": 123.5, "energy_kwh": 1e-5})
        _, data, page = build_report(out=mlflow_store / "later.html")
        folder = mlflow_store / "reports-here"
        folder.mkdir()
        into_folder, _, _ = build_report(out=folder)  # --out DIR: the page goes in it under its default name
    finally:
        mlflow.set_tracking_uri(None)
    assert into_folder == folder / "report.html" and into_folder.is_file()
    assert list(data["deltas"]["tables"]) == ["demo_cls"]
    assert "<h3>demo_cls</h3>" in page and "<td class=\"l\">lora</td>" in page and "0.625" in page
    assert "delta tuning: not run yet" not in page and "validation: not run yet" not in page
    v = data["validation"][0]
    assert v["decisions"] == {"cpmant.gate.perplexity": "pass", "cpmant.decision": "champion"}
    assert v["metrics"] == {"perplexity": 123.5}
    assert "cpmant.gate.perplexity" in page and "123.5" in page
    assert {s["stage"] for s in data["stages"]} == {"delta", "validate"}
