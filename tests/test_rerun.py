"""`cpmant rerun`: a recorded compression rung (and the pretraining run that made its parent) replayed into a fresh
CPMANT_HOME from what the tracking store recorded gives every reproducible metric equal to the last digit; a code
version that differs warns, and with --strict refuses."""

from __future__ import annotations

import pytest

from _micro_lifecycle import build


@pytest.mark.flow
def test_rerun_reproduces_every_metric_of_the_training_stages(prefect_harness, tmp_path, capsys):
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    from cpmant_cli.report_cmd import format_rerun
    from cpmant_cli.rerun import rerun
    from registry.rerun import metric_histories

    lc = build()
    uri = lc["compress"]["variants"][0]  # models:/cpm-ant-tiny-3b/1: the chain is pretrain -> compress
    old = os.environ.get("CPMANT_HOME")
    os.environ["CPMANT_HOME"] = str(lc["home"])
    try:
        res = rerun(uri, tmp_path / "again", progress=lambda *_: None)
        assert os.environ["CPMANT_HOME"] == str(lc["home"])  # the environment is restored
        loss = metric_histories(lc["pretrain"]["run_id"])["loss"]
    finally:
        os.environ["CPMANT_HOME"] = old
        mlflow.set_tracking_uri(None)
    assert [s["stage"] for s in res["stages"]] == ["pretrain", "compress"]
    assert res["stages"][0]["recorded_run"] == lc["pretrain"]["run_id"]
    pre, comp = res["stages"]
    assert pre["new_run"] != pre["recorded_run"] and comp["model"] == "models:/cpm-ant-tiny-3b/1"
    # the training metrics are compared at every step, the timing ones are not
    assert {"loss", "lr", "grad_norm", "valid_loss", "final_loss", "valid_loss_end", "num_parameters"} <= set(
        pre["compared"])
    assert {"lm_loss", "loss_increase", "params", "bytes_on_disk", "distill_loss"} <= set(comp["compared"])
    assert {"tokens_per_second", "duration_s", "energy_kwh", "cost_rmb", "mfu"} <= set(pre["skipped"])
    assert len(loss) == 8
    assert pre["differences"] == [] and comp["differences"] == [] and res["equal"], format_rerun(res)
    # the rerun lives in its own store under the new home
    assert (tmp_path / "again" / "mlflow.db").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'again' / 'mlflow.db'}")
    try:
        new_loss = sorted((m.step, m.value) for m in MlflowClient().get_metric_history(pre["new_run"], "loss"))
    finally:
        mlflow.set_tracking_uri(None)
    assert new_loss == loss
    text = format_rerun(res)
    assert "every reproducible metric equal to the last digit" in text


@pytest.mark.unit
def test_code_version_warns_and_strict_refuses():
    from cpmant.checkpoint import git_sha
    from cpmant.errors import CpmantError
    from cpmant_cli import rerun as R

    assert R.code_check("1111111", strict=True, now="1111111") is None
    with pytest.warns(UserWarning, match="made by code 2222222, this checkout is 1111111"):
        R.code_check("2222222", strict=False, now="1111111")
    with pytest.raises(CpmantError, match="--strict: the run was made by code 2222222") as e:
        R.code_check("2222222", strict=True, now="1111111")
    assert "git checkout 2222222" in e.value.fix
    with pytest.warns(UserWarning, match="records no code version; this checkout is 1111111"):
        R.code_check("", strict=False, now="1111111")
    assert R.code_check(git_sha(), strict=True) is None  # by default: this checkout's own version


@pytest.mark.unit
def test_the_comparison_catches_one_changed_digit_and_a_missing_metric(tmp_path):
    from cpmant.errors import CpmantError
    from cpmant_cli.rerun import _fresh
    from registry.rerun import compare_metrics, is_timing_metric

    a = {"loss": [(1, 2.5), (2, 2.25)], "duration_s": [(2, 1.0)], "lm_loss": [(0, 3.0)]}
    b = {"loss": [(1, 2.5), (2, 2.2500000000000004)], "duration_s": [(2, 9.0)]}
    out = compare_metrics(a, b)
    assert out["skipped"] == ["duration_s"]
    assert out["differences"] == ["lm_loss: logged by the recorded run only",
                                  "loss: step 2: 2.25 != 2.2500000000000004"]
    assert compare_metrics(a, a)["differences"] == []
    assert all(is_timing_metric(m) for m in ("step_tokens_per_second", "train_seconds", "emissions_kg_co2e"))
    assert not any(is_timing_metric(m) for m in ("loss", "lm_loss", "valid_loss", "bytes_on_disk"))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(CpmantError, match="is not an empty folder"):
        _fresh(tmp_path / "used")
