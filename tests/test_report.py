"""`cpmant report` on a micro lifecycle (a micro pretrain and one compression rung): one self-contained HTML page
with every section (those not run yet say so), logged as an artifact of a `report` run and as a Prefect markdown
artifact; the figures on the page are the ones MLflow holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from _micro_lifecycle import build
from registry import tags as T

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
        assert (f"corpus data:{base.tags[T.DATA_SHA256][:16]} &rarr; <code>models:/cpm-ant-tiny/1</code>"
                in page)
        assert "&rarr; <code>models:/cpm-ant-tiny-3b/1</code>" in page
        # the measured input of the projection is the pretraining run's throughput
        tps = client.get_run(pre_run).data.metrics["tokens_per_second"]
        assert report["measured"]["run_id"] == pre_run and report["measured"]["tokens_per_second"] == tps
        # the report run: the page and the projection as artifacts, published figures as params, no metrics
        run = client.get_run(report["run_id"])
        assert run.data.tags[T.STAGE] == "report" and run.info.run_name == "report"
        assert run.data.metrics == {}
        assert run.data.params["published.cpm_ant_cost_rmb"] == "430000.0"
        arts = {a.path for a in client.list_artifacts(report["run_id"], "report")}
        assert arts == {"report/report.html"}
        assert "projection.json" in {a.path for a in client.list_artifacts(report["run_id"])}
    finally:
        mp.undo()


def test_the_ladder_names_each_version_and_gives_the_base_its_shape(report):
    """The ladder as the compress stage logs it: the short version name first (MLflow's table view shows it
    whole), the base row with the parent's shape, counts as integers; the page's base row the same."""
    from mlflow.tracking import MlflowClient

    from conftest import MICRO_MODEL
    from registry.tracking import setup_tracking

    lc = report["lifecycle"]
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(lc["home"]))
    try:
        setup_tracking()
        import mlflow

        run = next(r for r in MlflowClient().search_runs([e.experiment_id for e in mlflow.search_experiments()])
                   if r.info.run_name == "compress-ladder")
        table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/ladder.json")
    finally:
        mp.undo()
    assert table["columns"][:3] == ["name", "recipe", "model"]
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["name"] for r in rows] == ["cpm-ant-tiny/1", "cpm-ant-tiny-3b/1"]
    base = rows[0]
    assert (base["attention_layers"], base["ffn_layers"], base["num_heads"], base["dim_ff"]) == (
        MICRO_MODEL["num_layers"], MICRO_MODEL["num_layers"], MICRO_MODEL["num_heads"], MICRO_MODEL["dim_ff"])
    assert isinstance(base["dim_ff"], int)
    cells = f'<td class="">{MICRO_MODEL["num_layers"]}</td>' * 2 + f'<td class="">{MICRO_MODEL["num_heads"]}</td>'
    assert cells + f'<td class="">{MICRO_MODEL["dim_ff"]}</td>' in _row(report["html"], "models:/cpm-ant-tiny/1")


def test_the_projection_and_both_emission_readings_are_on_the_page(report):
    page = report["html"]
    check = report["projection"][0]
    assert check["label"] == "CPM-Ant's own figures" and abs(check["cost_rmb"] / 430e3 - 1) < 0.25
    assert "0.178 kWh per A100-hour" in page and "under half of it" in page
    assert "4,872" in page and "46,700" in page and "430,000" in page
    labels = [r["label"] for r in report["projection"]]
    for name in ("A100", "H100", "H200"):  # the MFU was measured on this machine's CPU: GPU rows are hypothetical
        assert f"{name}, published utilisation" in page and f"{name}, our measured MFU" not in labels
        assert f"{name}, if a GPU reached the MFU measured here" in page
    assert "this machine, measured" in page and report["measured"]["flops_per_token"] > 0
    assert "circular" in page  # the published-throughput check says it reproduces the hours by construction
    # the text's second emissions reading is the table's first row, formatted once
    from tasks.report.scores import fmt

    assert f"emits <b>{fmt(check['emissions_kg_co2e'])} kg" in page
    assert "NVIDIA H200 datasheet" in page and "Uptime Institute" in page  # each figure names its source


def test_the_bases_heldout_losses_are_read_from_their_runs(report):
    """Under the ladder: the base's held-out loss as the rung logged it (`parent_lm_loss`) and as its pretraining run
    logged it (`valid_loss_end`), to 6 decimals, and whether they agree to 1e-4 said in the matching box."""
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking

    lc = report["lifecycle"]
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(lc["home"]))
    try:
        setup_tracking()
        client = MlflowClient()
        pre = client.get_run(lc["pretrain"]["run_id"]).data.metrics["valid_loss_end"]
        rung = client.get_model_version("cpm-ant-tiny-3b", "1").run_id
        parent = client.get_run(rung).data.metrics["parent_lm_loss"]
    finally:
        mp.undo()
    page = report["html"]
    assert (f'<td class="l">ladder parent row (parent_lm_loss)</td><td class="l">{parent:.6f}</td>' in page
            and f'<td class="l">pretraining (valid_loss_end)</td><td class="l">{pre:.6f}</td>' in page)
    box = "<b>Held-out losses disagree.</b>"
    assert (box in page) == (abs(parent - pre) > 1e-4)


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
        with mlflow.start_run(run_name="compare-demo_cls", tags={T.STAGE: "delta", T.TASK: "demo_cls"}):
            mlflow.log_table({"task": ["demo_cls"] * 2, "method": ["lora", "full"], "score": [0.625, 0.75],
                              "vs_full": [0.8333, 1.0], "trainable_params": [16384, 1200000]},
                             "comparison-demo_cls.json")
        with mlflow.start_run(run_name="validate-cpm-ant-tiny", tags={T.STAGE: "validate",
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
    assert "<h3>demo_cls</h3>" in page and "<td class=\"l\">lora</td>" in page
    # a table from before the intervals: the scores say they have none; its `vs_full` was the ratio to full
    lora = re.search(r'<tr><td class="l">lora</td>.*?</tr>', page).group(0)
    assert "0.625 (no interval)" in lora and "-0.125 (no interval)" in lora and "0.8333 (no interval)" in lora
    assert "delta tuning: not run yet" not in page and "validation: not run yet" not in page
    v = data["validation"][0]
    assert v["decisions"] == {"cpmant.gate.perplexity": "pass", "cpmant.decision": "champion"}
    assert v["metrics"] == {"perplexity": 123.5}
    assert "cpmant.gate.perplexity" in page and "123.5" in page
    assert {s["stage"] for s in data["stages"]} == {"delta", "validate"}


# ---- the report explains itself (issue 16, item 8): intervals, demo labels, readings of odd results ----------------
BASE = "models:/cpm-ant-tiny/1"


def _tuning_run(task, method, metrics, kind=None):
    import mlflow

    tags = {T.STAGE: "delta", T.TASK: task, T.METHOD: method, T.PARENT: BASE,
            T.TUNE_KIND: kind or ("zero-shot" if method == "zero-shot" else "delta")}
    with mlflow.start_run(run_name=f"tune-{task}-{method}", tags=tags) as run:
        mlflow.log_metrics(metrics)
    return run.info.run_id


def _ci(name, value, low, high):
    return {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high}


def _version(name, run_id, **tags):
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    c.create_registered_model(name)
    return c.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id, tags=tags)


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A store holding what the page must explain: demo-ccpm tuned with intervals (LoRA below zero-shot within
    noise and above full within noise, full below zero-shot significantly), c3 from an older run without
    intervals, a validated demo delta, and a ladder whose rung is below its parent while the base's three
    held-out losses differ."""
    import mlflow

    from registry.tracking import setup_tracking
    from tasks.report import build_report, render_markdown

    home = tmp_path_factory.mktemp("explained")
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        setup_tracking()  # this store (CPMANT_HOME), its `cpmant` experiment
        _tuning_run("demo-ccpm", "zero-shot", {**_ci("test_f1", 30.5, 18.5, 43.25), "test_accuracy": 31.0})
        _tuning_run("demo-ccpm", "lora", {**_ci("test_f1", 21.0, 12.5, 30.25), "trainable_ratio": 0.009,
                                          **_ci("vs_zero_shot_f1", -9.5, -21.5, 2.25),
                                          **_ci("vs_full_f1", 1.0, -4.5, 6.5),
                                          **_ci("ratio_to_full_f1", 1.05, 0.75, 1.5)})
        _tuning_run("demo-ccpm", "full", {**_ci("test_f1", 20.0, 11.5, 29.0), "trainable_ratio": 1.0,
                                          **_ci("vs_zero_shot_f1", -10.5, -18.25, -2.75)})
        # a task known only from its comparison table (tasks/tune.py's columns): read with its intervals
        with mlflow.start_run(run_name="compare-demo-lcsts", tags={T.STAGE: "delta", T.TASK: "demo-lcsts",
                                                                   T.TUNE_KIND: "comparison"}):
            mlflow.log_table({"task": ["demo-lcsts"] * 2, "method": ["zero-shot", "lora"], "metric": ["rouge_l"] * 2,
                              "score": [12.5, 14.0], "score_ci_low": [10.0, 11.5], "score_ci_high": [15.0, 16.5],
                              "vs_zero_shot": [None, 1.5], "vs_zero_shot_ci_low": [None, 0.25],
                              "vs_zero_shot_ci_high": [None, 2.75], "vs_full": [None, None],
                              "ratio_to_full": [None, None]}, "comparison-demo-lcsts.json")
        _tuning_run("c3", "zero-shot", {"test_accuracy": 40.0})
        _tuning_run("c3", "lora", {"test_accuracy": 35.0})
        with mlflow.start_run(run_name="validate-demo-delta", tags={
                T.STAGE: "validate", T.MODEL: "models:/cpm-ant-tiny-demo-ccpm-lora/1",
                T.TASK: "demo-ccpm", T.VALIDATION: "failed"}):
            mlflow.log_metrics({**_ci("task_score", 21.0, 12.5, 30.25), **_ci("task_vs_zero_shot", -9.5, -21.5, 2.25),
                                **_ci("task_vs_champion", -3.0, -5.5, -0.5), "lm_loss": 3.2})
        # the ladder: base (pretraining run, valid_loss_end 3.02), one rung logging parent_lm_loss 3.68 and a loss
        # below it, the ladder table, and a validation of the base at 3.155
        with mlflow.start_run(run_name="pretrain", tags={T.STAGE: "pretrain"}) as pre:
            mlflow.log_metrics({"valid_loss_end": 3.02})
        _version("cpm-ant-tiny", pre.info.run_id, **{T.STAGE: "pretrain", T.PARENT: ""})
        with mlflow.start_run(run_name="compress-3b", tags={T.STAGE: "compress", T.PARENT: BASE}) as rung:
            mlflow.log_metrics({"lm_loss": 3.5, "parent_lm_loss": 3.68, "eval_tokens": 4096})
        _version("cpm-ant-tiny-3b", rung.info.run_id, **{T.STAGE: "compress", T.PARENT: BASE})
        with mlflow.start_run(run_name="compress-ladder", tags={T.STAGE: "compress"}):
            mlflow.log_table({"model": [BASE, "models:/cpm-ant-tiny-3b/1"], "params": [2000, 1000],
                              "lm_loss": [3.68, 3.5], "loss_increase": [0.0, 3.5 / 3.68 - 1]}, "ladder.json")
        with mlflow.start_run(run_name="validate-cpm-ant-tiny-v1", tags={T.STAGE: "validate",
                                                                         T.MODEL: BASE}):
            mlflow.log_metrics({"lm_loss": 3.155, "perplexity": 23.45})
        path, data, page = build_report(out=home / "report.html")
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()
    return {"data": data, "page": page, "markdown": render_markdown(data, str(path))}


def _part(page: str, heading: str) -> str:
    """The page from the <h3> starting with `heading` to the next <h3>."""
    start = page.index(f"<h3>{heading}")
    end = page.find("<h3>", start + 1)
    return page[start:end if end > 0 else None]


def _validated(page: str, model: str) -> str:
    """The validation block (<details>...</details>) headed by the model it validated."""
    m = re.search(rf"<details[^>]*><summary><h3>(?:<span[^>]*>\w+</span> )?{re.escape(model)} <small>.*?</details>",
                  page, re.S)
    assert m, model
    return m.group(0)


def _row(page: str, first_cell: str) -> str:
    """The table row (<tr>...</tr>) whose first cell is `first_cell`."""
    m = re.search(rf'<tr><td class="l">{re.escape(first_cell)}</td>.*?</tr>', page)
    assert m, first_cell
    return m.group(0)


def test_every_score_shows_its_interval_or_says_it_has_none(explained):
    page = explained["page"]
    ccpm = _part(page, "demo-ccpm")
    assert "30.5 [18.5, 43.25]" in _row(ccpm, "zero-shot")
    lora = _row(ccpm, "lora")
    assert "21 [12.5, 30.25]" in lora and "-9.5 [-21.5, 2.25]" in lora and "1 [-4.5, 6.5]" in lora
    assert "1.05 [0.75, 1.5]" in lora and "0.90%" in lora  # ratio to full, the share of parameters trained
    assert "20 [11.5, 29]" in _row(ccpm, "full")
    lcsts = _part(page, "demo-lcsts")  # from the comparison table's columns
    assert "12.5 [10, 15]" in _row(lcsts, "zero-shot") and "14 [11.5, 16.5]" in _row(lcsts, "lora")
    assert "1.5 [0.25, 2.75]" in _row(lcsts, "lora") and "test rouge_l [95% interval]" in lcsts
    # an older run: the value with "(no interval)", never an interval made up by the report
    c3 = _part(page, "c3</h3>")
    assert "40 (no interval)" in _row(c3, "zero-shot") and "35 (no interval)" in _row(c3, "lora")
    assert "-5 (no interval)" in _row(c3, "lora")  # the plain difference, labelled
    # validation: the task score and paired differences with their intervals
    val = _validated(page, "models:/cpm-ant-tiny-demo-ccpm-lora/1")
    assert "21 [12.5, 30.25]" in _row(val, "task_score") and "-3 [-5.5, -0.5]" in _row(val, "task_vs_champion")
    assert "<td class=\"l\">3.2</td>" in _row(val, "lm_loss")  # a loss is not a score: no interval, no label
    md = explained["markdown"]
    assert "| demo-ccpm (demo task built from the installed corpus: not a CUGE score) | lora | 21 [12.5, 30.25] |" in md


def test_demo_tasks_are_labelled_never_cuge_scores(explained):
    page = explained["page"]
    label = "demo task built from the installed corpus: not a CUGE score"
    assert f'<h3>demo-ccpm <span class="demo">{label}</span></h3>' in page
    assert "<h3>c3</h3>" in page  # a CUGE task carries no label
    val = _validated(page, "models:/cpm-ant-tiny-demo-ccpm-lora/1")
    assert (f'<span class="fail">FAILED</span> models:/cpm-ant-tiny-demo-ccpm-lora/1 <small>run validate-demo-delta'
            f'</small> <span class="demo">{label}</span></h3>') in val
    assert f"demo-ccpm: {label}" in _row(val, "task_score")  # the validated delta's task score
    assert explained["data"]["deltas"]["tasks"]["demo-ccpm"]["demo"] is True
    assert explained["data"]["deltas"]["tasks"]["c3"]["demo"] is False


def test_odd_results_say_whether_they_are_noise(explained):
    page = explained["page"]
    ccpm = _part(page, "demo-ccpm")
    lora, full = _row(ccpm, "lora"), _row(ccpm, "full")
    # LoRA below zero-shot, paired interval [-21.5, 2.25] contains 0; above full, [-4.5, 6.5] contains 0
    assert "below zero-shot by 9.5 points: within noise (interval contains 0)" in lora
    assert "above full fine-tuning by 1 point: within noise (interval contains 0)" in lora
    # full below zero-shot, paired interval [-18.25, -2.75] excludes 0
    assert "below zero-shot by 10.5 points: significant (interval [-18.25, -2.75] excludes 0)" in full
    assert "within noise" not in full and "significant" not in _row(ccpm, "zero-shot")
    # an older run below zero-shot: no interval to decide with, and it says so
    c3 = _part(page, "c3</h3>")
    assert "below zero-shot by 5 points: no paired interval was logged" in _row(c3, "lora")
    # validation: below the champion significantly, below zero-shot within noise
    val = _validated(page, "models:/cpm-ant-tiny-demo-ccpm-lora/1")
    assert "below the champion by 3 points: significant (interval [-5.5, -0.5] excludes 0)" in _row(
        val, "task_vs_champion")
    assert "below the base&#x27;s zero-shot by 9.5 points: within noise" in _row(val, "task_vs_zero_shot")


def test_a_rung_below_its_parent_and_disagreeing_heldout_losses_are_said(explained):
    page, data = explained["page"], explained["data"]
    rung = _row(page, "models:/cpm-ant-tiny-3b/1")
    assert ("held-out loss 0.18 below its parent&#x27;s: the held-out loss difference has no interval; measured on "
            "4,096 held-out tokens") in rung
    h = data["heldout"]
    assert h["model"] == BASE and not h["agree"] and abs(h["spread"] - (3.68 - 3.02)) < 1e-12
    assert [r["held-out loss"] for r in h["rows"]] == [3.68, 3.02, 3.155]  # parent_lm_loss, valid_loss_end, lm_loss
    assert '<p class="warn"><b>Held-out losses disagree.</b>' in page and "differ by 0.66 (more than 0.0001)" in page
    assert "3.680000" in page and "3.020000" in page and "3.155000" in page
    assert "**Held-out losses disagree**" in explained["markdown"]


def test_heldout_losses_within_the_tolerance_agree():
    from tasks.report.scores import heldout, rung_reading

    ok = heldout(BASE, 3.02, 3.02005, 3.02)
    assert ok["agree"] and "agree" in ok["message"] and ok["spread"] == pytest.approx(5e-5)
    assert not heldout(BASE, 3.02, 3.0202, None)["agree"]  # 2e-4 apart: two measurements
    assert heldout(BASE, None, 3.02, None)["agree"]  # nothing to compare yet
    assert rung_reading(3.0, {"lm_loss": 2.9}, {}).endswith("a single measurement (the number of held-out tokens "
                                                            "was not logged)")
    assert rung_reading(3.0, {"lm_loss": 3.1}, {"eval_tokens": 10}) == ""  # above its parent: nothing odd


def test_comparison_plot_draws_each_interval(tmp_path):
    from tasks.plots import _errors, plot_comparison

    rows = [{"method": "zero-shot", "metric": "f1", "score": 30.5, "score_ci_low": 18.5, "score_ci_high": 43.25},
            {"method": "lora", "metric": "f1", "score": 21.0, "trainable_ratio": 0.009}]  # an older row: no bar
    assert _errors(rows) == [[12.0, 0.0], [12.75, 0.0]]
    out = plot_comparison(rows, tmp_path / "c.png", "demo-ccpm")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the report says what it means (issue 17, item 4): validations summarised, aliases, every chain, the ladder ----
DATA_SHA = "ab" * 32


def _registered(name: str, stage: str, parent: str = "", **tags) -> str:
    import mlflow

    with mlflow.start_run(run_name=f"make-{name}", tags={T.STAGE: stage}) as run:
        pass
    _version(name, run.info.run_id, **{T.STAGE: stage, T.PARENT: parent, T.DATA_SHA256: DATA_SHA,
                                       T.GIT_SHA: "c0de" * 10, **tags})
    return f"models:/{name}/1"


def _validation(model: str, verdict: str, failures: str = "") -> None:
    import mlflow

    with mlflow.start_run(run_name=f"validate-{model.split('/')[1]}-v1", tags={
            T.STAGE: "validate", T.MODEL: model, T.PARENT: BASE, T.VALIDATION: verdict,
            T.VALIDATION_FAILURES: failures, T.PROMOTED: "false"}):
        mlflow.log_params({"model": model, "promote": "True"})
        mlflow.log_metrics({"lm_loss": 3.2})


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A store shaped like a full lifecycle's: a base, four ladder rungs and int8, eight deltas of the base (13
    versions nobody descends from, int8 sorted last among them), a delta that is `candidate` and `champion`, a
    validation of each of the 14 versions with one failure (the 10th), and the ladder table as an older compress
    stage logged it (the base row without its shape, so `dim_ff` comes back as a float column)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from registry.tracking import setup_tracking
    from tasks.report import build_report, render_markdown

    home = tmp_path_factory.mktemp("labelled")
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMANT_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        setup_tracking()
        client = MlflowClient()
        uris = [_registered("cpm-ant-tiny", "pretrain")]
        for recipe in ("7b", "3b", "1b", "300m", "int8"):
            uris.append(_registered(f"cpm-ant-tiny-{recipe}", "compress", BASE))
        for task in ("demo-ccpm", "demo-c3", "demo-lcsts", "demo-math23k"):
            for method in ("lora", "full"):
                uris.append(_registered(f"cpm-ant-tiny-{task}-{method}", "delta", BASE,
                                        **{T.TASK: task, T.METHOD: method}))
        delta = "cpm-ant-tiny-demo-ccpm-lora"
        for alias in ("candidate", "champion"):
            client.set_registered_model_alias(delta, alias, "1")
        for i, uri in enumerate(uris):
            if i == 9:
                _validation(uri, "failed", "task_vs_champion: -3 [-5.5, -0.5] is below -1 (interval excludes 0)")
            else:
                _validation(uri, "passed")
        ladder = [BASE] + [f"models:/cpm-ant-tiny-{r}/1" for r in ("7b", "3b", "1b", "300m", "int8")]
        with mlflow.start_run(run_name="compress-ladder", tags={T.STAGE: "compress"}):
            mlflow.log_table({"model": ladder, "num_heads": [None, 32, 20, 16, 4, 32],
                              "dim_ff": [None, 384, 140, 26, 13, 384],
                              "params": [41000, 36000, 20000, 9000, 4000, 41000],
                              "lm_loss": [5.5, 5.6, 5.7, 5.9, 6.1, 5.51]}, "ladder.json")
        path, data, page = build_report(out=home / "report.html")
        mlflow_aliases = ",".join(client.get_model_version(delta, "1").aliases)
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()
    return {"data": data, "page": page, "markdown": render_markdown(data, str(path)), "uris": uris,
            "failed": uris[9], "mlflow_aliases": mlflow_aliases, "delta": f"models:/{delta}/1"}


def test_the_failed_validation_is_summarised_and_highlighted(labelled):
    page, failed = labelled["page"], labelled["failed"]
    val = page[page.index('<section id="validation">'):page.index('<section id="costs">')]
    # the summary first: counts over the 14 models, then the failure and why
    assert val.index("<b>13 passed, 1 failed</b>") < val.index("<details")
    assert f"<li><code>{failed}</code>: task_vs_champion: -3 [-5.5, -0.5] is below -1" in val
    # every validation is a collapsible block headed by the model it validated; the failed one first, open, marked
    blocks = re.findall(r"<details[^>]*>(?:(?!</details>).)*</details>", val, re.S)
    assert len(blocks) == 14
    assert blocks[0].startswith('<details id="v-') and 'class="vfail" open>' in blocks[0]
    assert f'<span class="fail">FAILED</span> {failed} <small>' in blocks[0]
    assert all('class="vrun">' in b and '<span class="ok">PASSED</span>' in b for b in blocks[1:])
    headed = {re.search(r"</span> (models:/\S+) <small>", b).group(1) for b in blocks}
    assert headed == set(labelled["uris"])  # each heading names the version validated, never its parent alone
    # the `promote` param is what was asked for, labelled as such beside what happened
    assert "promotion asked for (if every gate passes)" in blocks[0] and "promoted to champion" in blocks[0]
    assert f"**Validation: 13 passed, 1 failed**\n- failed: `{failed}`" in labelled["markdown"]


def test_aliases_are_mlflows(labelled):
    assert labelled["mlflow_aliases"] == "candidate,champion"
    row = _row(labelled["page"], labelled["delta"])
    assert f'<td class="l">{labelled["mlflow_aliases"]}</td>' in row and "[]" not in row
    version = next(v for v in labelled["data"]["versions"] if v["uri"] == labelled["delta"])
    assert version["aliases"] == ["candidate", "champion"]
    assert f"<code>{labelled['delta']}</code> (delta, @candidate,champion)" in labelled["page"]


def test_every_chain_is_on_the_page_int8_included(labelled):
    data, page = labelled["data"], labelled["page"]
    leaves = [u for u in labelled["uris"] if u != BASE]  # nobody descends from any version but the base
    assert len(data["lineages"]) == len(leaves) == 13
    assert {c[0]["uri"] for c in data["lineages"]} == set(leaves)
    assert "13 chains, one per version nobody descends from, covering 14 registered models." in page
    assert page.count("<p class='chain'>") == 13
    assert "&rarr; <code>models:/cpm-ant-tiny-int8/1</code> (compress)" in page


def test_the_ladder_table_prints_counts_as_integers(labelled):
    page = labelled["page"]
    base, int8 = _row(page, BASE), _row(page, "models:/cpm-ant-tiny-int8/1")
    assert '<td class="">384</td>' in int8 and "384.0" not in page
    assert '<td class="">41,000</td>' in base  # params: an integer with its separator


def test_the_ladder_plot_draws_rungs_as_a_line_and_int8_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.plots import draw_ladder

    rows = [{"model": BASE, "params": 41000, "lm_loss": 5.5, "published_loss_increase": 0.0},
            {"model": "models:/cpm-ant-tiny-3b/1", "params": 20000, "lm_loss": 5.7, "published_loss_increase": 0.076},
            {"model": "models:/cpm-ant-tiny-int8/1", "params": 41000, "lm_loss": 5.51},
            {"model": "models:/cpm-ant-tiny-300m/1", "params": 4000, "lm_loss": 6.1, "published_loss_increase": 0.24}]
    fig, ax = plt.subplots()
    try:
        assert draw_ladder(ax, rows)
        line, int8 = ax.lines[0], ax.lines[1]
        assert list(line.get_xdata()) == [4000, 20000, 41000]  # structured rungs by size, int8 not joined in
        assert list(int8.get_xdata()) == [41000] and int8.get_linestyle() == "None"
        assert "int8" in int8.get_label()
        assert sorted(t.get_text() for t in ax.texts) == ["300m", "3b", "base", "int8"]  # every point labelled
        assert ax.xaxis.get_ticklabels()[0].get_rotation() == 30  # x tick labels rotated apart
    finally:
        plt.close(fig)


def test_the_validation_description_is_markdown_mlflow_shows_well():
    """The run description (mlflow.note.content): MLflow's run page keeps no style attribute, so a `#` heading
    there overlaps its list and a table has no cell padding; the note has bold lines and lists instead, and keeps
    every value of the report's tables."""
    from tasks.notes import mlflow_note
    from tasks.validate import render_markdown

    res = {"model": "models:/cpm-ant-tiny-3b/1", "passed": False, "promoted": False, "parent": BASE,
           "champion": "", "failures": ["lm_loss 5.67 > limit 5.6"], "metrics": {}}
    report = {"kind": "variant", "seconds": {"lm": 1.25}, "task": None,
              "samples": [{"prompt": "北京", "text": "是 | 中国", "passed": True, "problems": []}]}
    rows = [{"metric": "lm_loss", "candidate": 5.67, "parent": 5.53, "champion": None}]
    decided = [{"metric": "lm_loss", "against": "parent", "rule": "<= parent x 1.1", "evidence": "", "value": 5.67,
                "limit": 5.6, "passed": False}]
    md = render_markdown(res, report, rows, decided, [])
    assert md.startswith("# Validation of") and "| lm_loss | 5.67 | 5.53 | - |" in md  # the full report: tables
    note = mlflow_note(md)
    lines = note.splitlines()
    assert not any(ln.lstrip().startswith(("#", "|")) for ln in lines)  # no heading, no table left
    assert lines[:2] == ["**Validation of models:/cpm-ant-tiny-3b/1 (variant): FAILED**", ""]
    assert "**Candidate, parent, champion**" in lines
    assert "- **lm_loss**: candidate 5.67; parent 5.53; champion -" in lines
    assert "- **lm_loss**: against parent; rule <= parent x 1.1; value 5.67; limit 5.6; result FAIL" in lines
    assert "- **北京**: continuation 是 | 中国; checks ok" in lines
    for i, ln in enumerate(lines):  # a bold heading line is followed by a blank line, then its list
        if ln.startswith("**") and ln.endswith("**"):
            assert lines[i + 1] == ""


def test_report_queries_read_plain_records_and_survive_a_lost_table(mlflow_store):
    """registry/report_queries.py, the report's only door to MLflow: runs come back as plain RunRecords newest
    first (filtered by stage), a metric history by step, a table the artifact store lost is left out, a deleted
    run's metrics are {}, and the `report` run's params are cut to MLflow's limit with the mark."""
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from registry import report_queries as Q
    from registry.limits import MARK

    try:
        Q.open_store("cpmant")
        with mlflow.start_run(run_name="older", tags={T.STAGE: "delta"}) as older:
            mlflow.log_table({"a": [1, 2]}, "kept.json")
            mlflow.log_table({"b": [3]}, "lost.json")
            for step, v in ((2, 0.5), (0, 1.5), (1, 1.0)):
                mlflow.log_metric("loss", v, step=step)
        with mlflow.start_run(run_name="newer", tags={T.STAGE: "validate"}):
            pass
        lost = Path(mlflow.get_run(older.info.run_id).info.artifact_uri.removeprefix("file://")) / "lost.json"
        lost.unlink()
        runs = Q.search_runs()
        delta = Q.search_runs("delta")
        page = mlflow_store / "page.html"
        page.write_text("<html></html>", encoding="utf-8")
        run_id = Q.record_report("cpmant", {T.STAGE: "report"}, str(page), {"row": [1]},
                                 {"long": "x" * (MAX_PARAM_VAL_LENGTH + 10)})
        long = mlflow.get_run(run_id).data.params["long"]
        history, tables = Q.metric_history(older.info.run_id, "loss"), Q.logged_tables(delta[0])
        gone = Q.run_metrics("no-such-run"), Q.run_metrics(None)
    finally:
        mlflow.set_tracking_uri(None)
    assert [r.name for r in runs] == ["newer", "older"] and [r.name for r in delta] == ["older"]
    assert delta[0].tags[T.STAGE] == "delta" and delta[0].status == "FINISHED"
    assert history == [(0, 1.5), (1, 1.0), (2, 0.5)]
    assert tables == {"kept.json": {"columns": ["a"], "data": [[1], [2]]}}
    assert len(long) == MAX_PARAM_VAL_LENGTH and long.endswith(MARK)
    assert gone == ({}, {})
