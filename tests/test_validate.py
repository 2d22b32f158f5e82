"""Validation and promotion: the smoke checks and the gates against hand-computed limits (MLflow's MetricThreshold
semantics), then end to end on a registered micro model: a passing candidate becomes `champion`, a failing one
(a tight gate) does not and the reason is recorded on the run and the version, the three-way comparison is logged,
an identical validation is reused, `cpmant promote` records who and why, and a bad URI is one clear error."""

from __future__ import annotations

import getpass

import pytest

from conftest import registered_micro_model


# ---- pure checks ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_find_loop_and_utf8():
    from cpmant.validation.checks import find_loop, smoke_check, smoke_summary, valid_utf8

    assert find_loop([5, 5, 5, 5], max_ngram=4, max_repeats=3) == (1, 0, 4)  # 4 > 3 back-to-back repeats
    assert find_loop([5, 5, 5], max_ngram=4, max_repeats=3) is None  # 3 is allowed
    assert find_loop([1, 2, 7, 8, 7, 8, 7, 8, 7, 8, 9], max_ngram=4, max_repeats=3) == (2, 2, 4)
    assert find_loop([1, 2, 3, 1, 2, 3, 1, 2, 3], max_ngram=2, max_repeats=2) is None  # a 3-gram, n capped at 2
    assert find_loop(list(range(30)), 4, 1) is None
    # whitespace runs are layout (fortunes-zh indents its attributions), not loops; a word repeated still is one
    from cpmant.tokenizer import SPECIAL_TOKENS

    space, newline = SPECIAL_TOKENS.index("</_>"), SPECIAL_TOKENS.index("</n>")
    assert find_loop([9, space, space, space, space, space, 10], 4, 3, ignore={space, newline}) is None
    assert find_loop([9, 11, 11, 11, 11, 10], 4, 3, ignore={space, newline}) == (1, 1, 4)
    assert smoke_check("p", [9, space, space, space, space, space, 10], "x     y", unk_id=1).loop == ""
    assert valid_utf8("床前明月光") and not valid_utf8("a\ufffdb") and not valid_utf8("\ud800")
    ok = smoke_check("p", [10, 11, 12], "明月光", unk_id=1)
    bad = smoke_check("p", [1, 9, 9, 9, 9], "  ", unk_id=1, max_ngram=2, max_repeats=3)
    assert ok.passed and not bad.passed
    assert bad.problems == ["empty", "1 <unk>", "loop (1-gram x4 at token 1)"]
    s = smoke_summary([ok, bad])
    assert s["smoke_pass_rate"] == 0.5 and s["loop_rate"] == 0.5 and s["unk_rate"] == pytest.approx(1 / 8)


@pytest.mark.unit
def test_gate_limits_follow_mlflow_formulas():
    from cpmant.validation.config import ValidateConfig
    from cpmant.validation.gates import describe_failure, plan_checks

    cfg = ValidateConfig(gates={
        "perplexity": {"threshold": 300.0, "parent": {"max_relative_regression": 0.5},
                       "champion": {"min_relative_change": 0.1, "min_absolute_change": 5.0}},
        "tokens_per_second": {"champion": {"max_relative_regression": 0.25}},
        "unk_rate": None, "smoke_pass_rate": None, "first_token_ms_p95": None})
    # timings: the champion's baseline is the one measured beside the candidate (champion_*), not its record (999)
    # (perplexity: all three measured on the same held-out rows, the same heldout_sha256)
    cand = {"perplexity": 150.0, "tokens_per_second": 70.0, "champion_tokens_per_second": 100.0,
            "heldout_sha256": "h"}
    checks, skipped = plan_checks(cfg, "compress", cand, {"perplexity": 120.0, "heldout_sha256": "h"},
                                  {"perplexity": 160.0, "tokens_per_second": 999.0, "heldout_sha256": "h"})
    by = {(c.metric, c.against, c.threshold is not None): c for c in checks}
    assert by[("perplexity", "threshold", True)].limit == 300.0
    assert by[("perplexity", "parent", True)].limit == pytest.approx(180.0)  # 120 * (1 + 0.5)
    # MLflow, lower is better: <= baseline - min_absolute_change and <= baseline - rel * |baseline|: the stricter
    assert by[("perplexity", "champion", False)].limit == pytest.approx(min(160 - 5.0, 160 - 16.0))
    assert by[("tokens_per_second", "champion", True)].limit == pytest.approx(75.0)  # 100 * (1 - 0.25)
    assert skipped == []
    # no champion: its comparisons are skipped and said so; a delta-only gate does not apply to a base
    _, skipped = plan_checks(cfg, "pretrain", {**cand, "champion_tokens_per_second": None}, None, None)
    assert {(s["metric"], s["against"], s["reason"]) for s in skipped} == {
        ("perplexity", "parent", "no parent"), ("perplexity", "champion", "no champion"),
        ("tokens_per_second", "champion", "no champion")}
    assert describe_failure(by[("tokens_per_second", "champion", True)]) == \
        "tokens_per_second 70 < 75 (>= champion -25% (at most 25% worse): champion 100)"


@pytest.mark.flow
def test_decide_uses_mlflow_semantics():
    from cpmant.validation.gates import Check
    from registry.promotion import decide

    out = decide([
        Check("perplexity", "threshold", False, 150.0, None, threshold=140.0),
        Check("perplexity", "champion", False, 150.0, 160.0, min_absolute_change=10.0),  # 150 <= 150: passes
        Check("perplexity", "champion", False, 150.1, 160.0, min_absolute_change=10.0),
        Check("task_score", "champion", True, 0.1, 0.0, min_relative_change=0.5),  # zero baseline: > 0 passes
        Check("task_score", "threshold", True, None, None, threshold=0.0),  # missing value fails
    ])
    assert [d["passed"] for d in out] == [False, True, False, True, False]
    assert "perplexity threshold = 140" in out[0]["mlflow_message"]


# ---- end to end ------------------------------------------------------------------------------------------------
FAST = {"batch_size": 4, "prompts": ["床前明月光", "春眠不觉晓", "白日依山尽"],
        "max_new_tokens": 6, "speed_repeats": 1, "latency_repeats": 1,
        "gates": {"smoke_pass_rate": None, "tokens_per_second": None, "first_token_ms_p95": None}}


def _config(**validation):
    return {"validation": {**FAST, **validation}, "tracking": {"measure_power_secs": 1}}


@pytest.fixture(scope="module")
def store(tmp_path_factory, fixture_corpus):
    home = tmp_path_factory.mktemp("validate_home")
    mp, model_dir, reg = registered_micro_model(home, fixture_corpus, max_steps=2, warmup_steps=1,
                                                valid_fraction=0.25)
    yield {"home": home, "uri": reg.uri, "dir": model_dir}
    mp.undo()


@pytest.mark.flow
def test_validate_promotes_passing_and_not_failing(prefect_harness, store):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.validate import validate_flow
    from registry.aliases import get_alias
    from registry.register import register_checkpoint

    client = MlflowClient()
    out = validate_flow([store["uri"]], _config())
    r = out["results"][0]
    assert r["model"] == "models:/cpm-ant-tiny/1" and r["passed"] and r["promoted"] and r["failures"] == []
    assert get_alias("cpm-ant-tiny", "champion") == 1
    run = client.get_run(r["run_id"])
    assert run.data.tags["cpmant.stage"] == "validate" and run.data.tags["cpmant.validation"] == "passed"
    for k in ("perplexity", "tokens_per_second", "peak_memory_mb", "first_token_ms_p50", "first_token_ms_p95",
              "energy_kwh", "emissions_kg_co2e", "cost_rmb", "duration_s"):
        assert k in run.data.metrics, k
    assert 1 < run.data.metrics["perplexity"] < 600  # better than uniform over the 600-token vocab... or near it
    mv = client.get_model_version("cpm-ant-tiny", "1")
    assert mv.tags["cpmant.validation"] == "passed" and mv.tags["cpmant.validation_run_id"] == r["run_id"]
    assert mv.tags["cpmant.promoted_by"] == "validation"
    md = mlflow.artifacts.load_text(f"runs:/{r['run_id']}/validation_report.md")
    assert "PASSED" in md and "床前明月光" in md
    assert out["summary"][0]["stage"] == "validate" and out["summary"][0]["note"] == "passed, now champion"

    # the run carries the validation's one reuse key (sha256 over the version, weights, settings, rows, gates, code)
    key = run.data.tags["cpmant.inputs_sha256"]
    assert len(key) == 64 and r["reason"] == (f"validate models:/cpm-ant-tiny/1: made anew: no result of validations"
                                              f" of models:/cpm-ant-tiny/1 against champion none has key {key[:12]}")
    # the same version, settings and champion: reused, no new run; the reason names the run and the key
    rerun = validate_flow([store["uri"]], _config())
    again = rerun["results"][0]
    assert again["reused"] and again["run_id"] == r["run_id"] and again["passed"]
    assert again["reason"] == f"validate models:/cpm-ant-tiny/1: reused runs:/{r['run_id']}: same key {key[:12]}"
    assert rerun["summary"][0]["reason"] == again["reason"] and rerun["summary"][0]["reused"]

    # a second version (a "variant" of version 1) against a gate it cannot pass: champion stays
    reg2 = register_checkpoint(store["dir"], "cpm-ant-tiny", stage="compress", parent="models:/cpm-ant-tiny/1")
    tight = _config(gates={**FAST["gates"], "perplexity": {"threshold": 1.0}})
    r2 = validate_flow([reg2.uri], tight)["results"][0]
    assert not r2["passed"] and not r2["promoted"]
    # in Prefect: the failed gate is the task run's state, named Rejected, with the gate in its message and its log
    from _prefect_runs import task_run_log, task_runs

    (tr2,) = task_runs([f"validate-cpm-ant-tiny-{reg2.version}"])
    assert tr2.state.type.value == "COMPLETED" and tr2.state.name == "Rejected", tr2.state
    assert tr2.state.message.startswith(f"{reg2.uri} rejected: perplexity ")
    log2 = task_run_log(tr2.id)
    assert f"decision: rejected, gate failed: {r2['failures'][0]}" in log2, log2
    assert any(m.startswith("metrics: ") and "perplexity " in m for m in log2), log2
    assert {t.state.name for t in task_runs(["validate-cpm-ant-tiny-1"])} == {"Completed"}  # passed, reused
    assert get_alias("cpm-ant-tiny", "champion") == 1
    ppl = r2["metrics"]["perplexity"]
    assert r2["failures"][0].startswith(f"perplexity {ppl:.6g} > 1 (<= 1")
    run2 = client.get_run(r2["run_id"])
    assert run2.data.tags["cpmant.validation"] == "failed"
    assert run2.data.tags["cpmant.gate.perplexity.threshold"].startswith("failed: perplexity ")
    assert "limit 1" in run2.data.tags["cpmant.gate.perplexity.threshold"]
    assert run2.data.params["gate.perplexity.threshold"] == "<= 1"
    mv2 = client.get_model_version("cpm-ant-tiny", str(reg2.version))
    assert mv2.tags["cpmant.validation"] == "failed" and "perplexity" in mv2.tags["cpmant.validation_failures"]
    # the three-way comparison: parent and champion (both version 1) from version 1's validation run
    table = mlflow.load_table("comparison.json", run_ids=[r2["run_id"]])
    row = table[table["metric"] == "perplexity"].iloc[0]
    v1 = run.data.metrics["perplexity"]
    assert row["candidate"] == pytest.approx(ppl) and row["parent"] == pytest.approx(v1)
    assert row["champion"] == pytest.approx(v1)
    assert run2.data.params["champion_metrics_from"] == f"validation run {r['run_id']}"
    gates = mlflow.load_table("gates.json", run_ids=[r2["run_id"]])
    assert set(gates["against"]) == {"threshold", "parent", "champion"}

    # nightly: the champion again, against its own earlier validation; nothing moves
    from flows.validate import validate_champions_flow

    night = validate_champions_flow(_config())["results"]
    assert [n["model"] for n in night] == ["models:/cpm-ant-tiny/1"] and not night[0]["reused"]
    assert not night[0]["promoted"] and get_alias("cpm-ant-tiny", "champion") == 1
    assert client.get_run(night[0]["run_id"]).data.params["champion_metrics_from"].startswith("validation run ")
    # another gate is another key: measured again
    other = validate_flow([store["uri"]], _config(gates={**FAST["gates"], "perplexity": {"threshold": 1e6}}),
                          promote=False)["results"][0]
    assert not other["reused"] and other["run_id"] not in (r["run_id"], night[0]["run_id"])
    assert "made anew: no result of validations" in other["reason"]


@pytest.mark.flow
def test_cli_promote_records_who_and_why_and_bad_uris(prefect_harness, store, capsys):
    from mlflow.tracking import MlflowClient

    from cpmant_cli.main import main
    from registry.aliases import get_alias
    from registry.register import register_checkpoint

    reg = register_checkpoint(store["dir"], "cpm-ant-tiny-manual")
    assert main(["promote", reg.uri, "--reason", "hand-checked poems"]) == 0
    assert get_alias("cpm-ant-tiny-manual", "champion") == reg.version
    client = MlflowClient()
    mv = client.get_model_version("cpm-ant-tiny-manual", str(reg.version))
    assert mv.tags["cpmant.promoted_by"] == getpass.getuser()
    assert mv.tags["cpmant.promotion_reason"] == "hand-checked poems"
    assert "Promoted to champion by" in mv.description and "hand-checked poems" in mv.description
    run = client.get_run(mv.tags["cpmant.promotion_run_id"])
    assert run.data.tags["cpmant.stage"] == "promote" and run.data.params["user"] == getpass.getuser()
    capsys.readouterr()

    for argv, says in [(["validate", "models:/no-such-model/1"], "no-such-model"),
                       (["validate", "cpm-ant-tiny"], "not a registry uri"),
                       (["promote", "models:/cpm-ant-tiny/99", "--reason", "x"], "99"),
                       (["promote", reg.uri, "--reason", " "], "--reason"),
                       (["validate", reg.uri, "--set", "validation.gates.bogus.threshold=1"], "greater_is_better")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "\nfix: " in err and "Traceback" not in err, err
        assert says in err.lower(), (argv, err)
