"""Gates with evidence: a delta's task gates are paired bootstrap intervals on the same test examples (against its
base scored zero-shot and against the champion), and the timing gates compare with the champion timed beside the
candidate in the same run, alternating, never with a recorded figure.

Unit: hand-checkable predictions (all right, all wrong, half right) give the intervals and decisions by hand; the
timings alternate candidate and champion. End to end on a micro base and a registered LoRA delta of it: the task's
predictions are stubbed through `Task.predict`'s `zero_shot` parameter (a micro model's real scores are noise), so
that a delta below its base zero-shot is refused and one clearly above is promoted, with the interval on the gate's
record; a third version is compared with that champion measured in the same run."""

from __future__ import annotations

import pytest
import torch

from conftest import registered_micro_model

N = 40  # examples: labels cycle 0..3


def _examples():
    from cpmant.cuge.base import Example

    return [Example(input=f"q{i}", options=("甲", "乙", "丙", "丁"), label=i % 4, target="甲乙丙丁"[i % 4])
            for i in range(N)]


def _wrong(examples):
    return [(ex.label + 1) % 4 for ex in examples]


def _half(examples):
    """Right on the first half, wrong on the rest: accuracy 50."""
    return [ex.label if i < len(examples) // 2 else (ex.label + 1) % 4 for i, ex in enumerate(examples)]


@pytest.mark.unit
def test_task_comparison_intervals_by_hand():
    from cpmant.cuge import get_task
    from cpmant.validation.suite import task_comparison

    task = get_task("demo-c3")  # primary metric: accuracy (percent)
    ex = _examples()
    gold = [e.label for e in ex]
    # all right vs all wrong: every resample gives 100 - 0, the interval is [100, 100]
    m = task_comparison(task, ex, gold, zero_shot_preds=_wrong(ex))
    assert m["task_score"] == pytest.approx(100.0) and m["zero_shot_task_score"] == pytest.approx(0.0)
    assert m["task_vs_zero_shot"] == pytest.approx(100.0)
    assert m["task_vs_zero_shot_ci_low"] == pytest.approx(100.0) == m["task_vs_zero_shot_ci_high"]
    assert "task_vs_champion" not in m
    # half right vs all right: 50 - 100 = -50, the interval is below zero
    m = task_comparison(task, ex, _half(ex), zero_shot_preds=gold, champion_preds=_half(ex))
    assert m["task_score"] == pytest.approx(50.0)
    assert m["task_score_ci_low"] < 50.0 < m["task_score_ci_high"]
    assert m["task_vs_zero_shot"] == pytest.approx(-50.0) and m["task_vs_zero_shot_ci_high"] < 0
    # the same predictions as the champion: exactly 0, [0, 0]
    assert (m["task_vs_champion"], m["task_vs_champion_ci_low"], m["task_vs_champion_ci_high"]) == (0.0, 0.0, 0.0)


@pytest.mark.flow
def test_interval_gates_decide_above_zero_and_not_worse():
    from cpmant.validation.config import ValidateConfig
    from cpmant.validation.gates import describe_failure, plan_checks
    from registry.promotion import decide

    cfg = ValidateConfig(gates={"unk_rate": None, "smoke_pass_rate": None, "tokens_per_second": None,
                                "first_token_ms_p95": None})

    def gates(cand, unmeasured=None):
        checks, skipped = plan_checks(cfg, "delta", cand, None, None, unmeasured or {})
        return {c.metric: (c, d["passed"]) for c, d in zip(checks, decide(checks))}, skipped

    iv = lambda name, v, lo, hi: {name: v, f"{name}_ci_low": lo, f"{name}_ci_high": hi}  # noqa: E731
    # clearly above zero-shot, no champion: passes, the champion comparison is skipped with the suite's reason
    got, skipped = gates(iv("task_vs_zero_shot", 12.0, 4.0, 20.0), {"task_vs_champion": "no champion"})
    assert got["task_vs_zero_shot_ci_low"][1] and skipped == [
        {"metric": "task_vs_champion", "against": "champion", "reason": "no champion"}]
    # an interval touching zero is not above it (strict), nor is one below it
    for lo in (0.0, -3.0):
        got, _ = gates({**iv("task_vs_zero_shot", 5.0, lo, 9.0), **iv("task_vs_champion", 0.0, 0.0, 0.0)})
        check, passed = got["task_vs_zero_shot_ci_low"]
        assert not passed and got["task_vs_champion_ci_high"][1]  # [0, 0]: not worse than the champion
        assert describe_failure(check) == (f"task_vs_zero_shot 5 [{lo:g}, 9] (95% interval above 0: lower bound > 0 "
                                           "(better than zero-shot)): failed")
    # significantly worse than the champion fails; a delta whose differences were never measured fails too
    got, _ = gates({**iv("task_vs_zero_shot", 5.0, 1.0, 9.0), **iv("task_vs_champion", -4.0, -7.0, -0.5)})
    assert got["task_vs_zero_shot_ci_low"][1] and not got["task_vs_champion_ci_high"][1]
    got, _ = gates({})
    assert not got["task_vs_zero_shot_ci_low"][1] and got["task_vs_zero_shot_ci_low"][0].value is None


@pytest.mark.unit
def test_timings_alternate_candidate_and_champion():
    from cpmant.validation import suite
    from cpmant.validation.config import ValidateConfig

    calls = []

    def timed_batch(m, t, cfg):  # a clock of our own: "a" generates 10 ids in 0.5 s, "b" in 0.25 s
        calls.append(("batch", m))
        return 10, 0.5 if m == "a" else 0.25

    def first_token(m, t, p, cfg):
        calls.append((p, m))
        return 0.002 if m == "a" else 0.004

    cfg = ValidateConfig(prompts=["x", "y"], speed_repeats=2, latency_repeats=1)
    out = suite.measure_timings({"candidate": ("a", None), "champion": ("b", None)}, cfg, timed_batch, first_token)
    # warm-up of each, then candidate, champion, candidate, champion; per prompt candidate then champion
    assert calls == [("batch", "a"), ("x", "a"), ("y", "a"), ("batch", "b"), ("x", "b"), ("y", "b"),
                     ("batch", "a"), ("batch", "b"), ("batch", "a"), ("batch", "b"),
                     ("x", "a"), ("x", "b"), ("y", "a"), ("y", "b")]
    assert out["candidate"]["tokens_per_second"] == pytest.approx(20 / 1.0)
    assert out["champion"]["tokens_per_second"] == pytest.approx(20 / 0.5)
    assert out["champion"]["first_token_ms_p50"] == pytest.approx(4.0)


# ---- end to end ------------------------------------------------------------------------------------------------
FAST = {"batch_size": 4, "prompts": ["床前明月光", "春眠不觉晓"], "max_new_tokens": 4,
        "task_examples": 64, "gates": {"smoke_pass_rate": None, "first_token_ms_p95": None,
                                      "tokens_per_second": {"champion": {"max_relative_regression": 1000.0}}}}
DELTA = "cpm-ant-tiny-demo-c3-lora"
TASK = "c3-scripted"  # C3's accuracy: its intervals are quick (macro-F1's recompute sklearn's f1 each resample)


SCRIPTED = {"gold": lambda ex: [e.label for e in ex], "wrong": lambda ex: _wrong(ex), "half": lambda ex: _half(ex)}


@pytest.fixture(scope="module")
def scripted_task(tmp_path_factory):
    """A task added the way any task is (cpmant.cuge.register_task): C3's format and scoring on N hand-made
    questions, whose predictions the test sets (`mode`: zero-shot for the base, tuned for any delta). Returns
    (name, data folder, mode)."""
    import dataclasses
    import json

    from cpmant.cuge import base as cuge
    from cpmant.cuge.base import Task, register_task

    mode = {"tuned": "gold", "zero_shot": "gold"}

    @dataclasses.dataclass
    class Scripted(Task):
        def predict(self, model, tokenizer, examples, batch_size=8, generation=None, zero_shot=False):
            return SCRIPTED[mode["zero_shot" if zero_shot else "tuned"]](examples)

    c3 = cuge.get_task("c3")
    fields = {f.name: getattr(c3, f.name) for f in dataclasses.fields(Task) if f.init}
    register_task(TASK)(lambda: Scripted(**{**fields, "name": TASK}))
    data = tmp_path_factory.mktemp("scripted_c3")
    rows = [[[f"第{i}首"], [{"question": f"q{i}", "choice": ["甲", "乙", "丙", "丁"], "answer": "甲乙丙丁"[i % 4]}],
             f"id{i}"] for i in range(N)]
    for split in ("train", "valid", "test"):
        (data / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    yield TASK, str(data), mode
    cuge.TASKS.pop(TASK)


@pytest.fixture(scope="module")
def delta_store(tmp_path_factory, fixture_corpus, scripted_task):
    from cpmant import checkpoint as ck
    from cpmant.delta.checkpoint import save_delta
    from cpmant.delta.methods import apply_delta

    home = tmp_path_factory.mktemp("evidence_home")
    mp, base_dir, reg = registered_micro_model(home, fixture_corpus, max_steps=2, warmup_steps=1,
                                               valid_fraction=0.25)
    model, _ = ck.load_pretrained(base_dir)
    delta_dir = save_delta(home / "delta", apply_delta(model, "lora"), base_dir, base_uri=reg.uri, task=TASK)
    yield {"base_uri": reg.uri, "delta_dir": delta_dir, "task_data": scripted_task[1]}
    mp.undo()


@pytest.fixture
def stub_predict(scripted_task):
    """The scripted task's predictions, set by the test (`update(tuned=..., zero_shot=...)`)."""
    from cpmant.validation.suite import _ZERO_SHOT

    class Mode:
        def update(self, **kw):  # the base's zero-shot predictions are kept per base: forget them when they change
            _ZERO_SHOT.clear()
            scripted_task[2].update(**kw)

    return Mode()


@pytest.mark.flow
def test_delta_promoted_only_above_zero_shot_and_not_worse(prefect_harness, delta_store, stub_predict):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.validate import validate_flow
    from registry.aliases import get_alias
    from registry.register import register_checkpoint

    torch.set_num_threads(1)
    client = MlflowClient()
    config = {"validation": {**FAST, "task_data": delta_store["task_data"]}, "tracking": {"measure_power_secs": 1}}

    def new_version():
        return register_checkpoint(delta_store["delta_dir"], DELTA, stage="delta", parent=delta_store["base_uri"])

    # 1. below its base zero-shot (all wrong vs all right): refused, the interval on the record
    stub_predict.update(tuned="wrong", zero_shot="gold")
    r1 = validate_flow([new_version().uri], config)["results"][0]
    assert not r1["passed"] and not r1["promoted"] and get_alias(DELTA, "champion") is None
    m1 = r1["metrics"]
    assert m1["task_score"] == pytest.approx(0.0) and m1["zero_shot_task_score"] == pytest.approx(100.0)
    assert (m1["task_vs_zero_shot"], m1["task_vs_zero_shot_ci_high"]) == (pytest.approx(-100.0),
                                                                          pytest.approx(-100.0))
    assert r1["failures"] == ["task_vs_zero_shot -100 [-100, -100] (95% interval above 0: lower bound > 0 "
                              "(better than zero-shot)): failed"]
    run1 = client.get_run(r1["run_id"])
    for k in ("task_score_ci_low", "task_score_ci_high", "task_vs_zero_shot_ci_low", "task_vs_zero_shot_ci_high"):
        assert k in run1.data.metrics, k
    assert "task_vs_champion: skipped (no champion)" in run1.data.tags["cpmant.validation_evidence"]
    gates = mlflow.load_table("gates.json", run_ids=[r1["run_id"]])
    row = gates[gates["metric"] == "task_vs_zero_shot_ci_low"].iloc[0]
    assert row["against"] == "zero_shot" and not row["passed"]
    assert row["evidence"].startswith("task_vs_zero_shot -100 [")

    # 2. clearly above zero-shot (all right vs all wrong): promoted; the version says why
    stub_predict.update(tuned="gold", zero_shot="wrong")
    reg2 = new_version()
    r2 = validate_flow([reg2.uri], config)["results"][0]
    assert r2["passed"] and r2["promoted"] and get_alias(DELTA, "champion") == reg2.version
    m2 = r2["metrics"]
    assert (m2["task_vs_zero_shot"], m2["task_vs_zero_shot_ci_low"]) == (pytest.approx(100.0), pytest.approx(100.0))
    mv2 = client.get_model_version(DELTA, str(reg2.version))
    assert "task_vs_zero_shot 100 [100, 100] (95% interval above 0" in mv2.tags["cpmant.promotion_reason"]
    assert "Validation evidence (run " in mv2.description and "task_vs_zero_shot 100 [100, 100]" in mv2.description
    assert "champion_tokens_per_second" not in m2  # no champion to time beside it

    # 3. a third version against that champion, both measured in this run: the same predictions are not worse
    reg3 = new_version()
    r3 = validate_flow([reg3.uri], config)["results"][0]
    m3 = r3["metrics"]
    assert (m3["task_vs_champion"], m3["task_vs_champion_ci_high"]) == (0.0, 0.0) and r3["passed"]
    assert m3["champion_task_score"] == pytest.approx(100.0)
    # the speed gate's baseline is the champion timed beside the candidate now, not its recorded figure
    gates = mlflow.load_table("gates.json", run_ids=[r3["run_id"]])
    speed = gates[(gates["metric"] == "tokens_per_second") & (gates["against"] == "champion")].iloc[0]
    recorded = client.get_run(r2["run_id"]).data.metrics["tokens_per_second"]
    assert speed["baseline"] == pytest.approx(m3["champion_tokens_per_second"])
    assert speed["baseline"] != recorded
    assert client.get_run(r3["run_id"]).data.metrics["champion_tokens_per_second"] == \
        pytest.approx(speed["baseline"])
    table = mlflow.load_table("comparison.json", run_ids=[r3["run_id"]])
    row = table[table["metric"] == "tokens_per_second"].iloc[0]
    assert row["champion"] == pytest.approx(m3["champion_tokens_per_second"])
    assert get_alias(DELTA, "champion") == reg3.version

    # 4. the champion validated again (nightly): no champion beside itself, the timing comparison says so
    from flows.validate import validate_champions_flow

    night = [n for n in validate_champions_flow(config)["results"] if n["model"] == reg3.uri][0]
    skipped = mlflow.artifacts.load_dict(f"runs:/{night['run_id']}/validation_report.json")["skipped"]
    assert {"metric": "tokens_per_second", "against": "champion",
            "reason": "the candidate is the champion"} in skipped
