"""The tune stage without a flow: paired comparisons from stored predictions, the table's intervals and its reading
in words (tasks/tune/compare.py), the reuse keys and what changes them (tasks/tune/keys.py), and the one check of
task and method names at the flow's edge (flows/tune.py)."""

import dataclasses
from pathlib import Path

import pytest

from cpmant.cuge import Example
from cpmant.errors import CpmantError
from tasks.tune import paired_comparisons, table_rows

pytestmark = pytest.mark.unit
N = 200


def _examples():
    return [Example(input=f"q{i}", options=("a", "b", "c", "d"), label=i % 4) for i in range(N)]


def _preds(right: int):
    """The first `right` examples answered correctly, the others wrong."""
    return [i % 4 if i < right else (i + 1) % 4 for i in range(N)]


def _row(method, right, score_ci=(None, None)):
    return {"task": "demo-c3", "method": method, "model": f"models:/m-{method}/1", "metric": "accuracy",
            "score": 100 * right / N, "score_ci_low": score_ci[0], "score_ci_high": score_ci[1],
            "predictions": _preds(right), "trainable_ratio": 0.009 if method == "lora" else 1.0, "run_id": ""}


def test_paired_comparisons_and_table():
    zero, lora, full = _row("zero-shot", 50), _row("lora", 90), _row("full", 100)
    cmp = paired_comparisons("demo-c3", zero, [lora, full], _examples())
    # lora is right on 40 more examples than zero-shot (+20 points), on 10 fewer than full (-5 points, ratio 0.9)
    assert cmp["lora"]["vs_zero_shot_accuracy"] == pytest.approx(20.0)
    assert cmp["lora"]["vs_zero_shot_accuracy_ci_low"] > 0
    assert cmp["lora"]["vs_full_accuracy"] == pytest.approx(-5.0)
    assert cmp["lora"]["vs_full_accuracy_ci_high"] < 0  # a's right answers are a subset of b's: never above
    assert cmp["lora"]["ratio_to_full_accuracy"] == pytest.approx(0.9)
    assert "vs_full_accuracy" not in cmp["full"] and cmp["full"]["vs_zero_shot_accuracy"] == pytest.approx(25.0)
    table = table_rows(zero, [full, lora], cmp)
    assert [r["method"] for r in table] == ["zero-shot", "lora", "full"]
    assert table[1]["vs_full"] == pytest.approx(-5.0) and table[1]["ratio_to_full"] == pytest.approx(0.9)
    assert table[1]["reading"].startswith("above zero-shot; below full; at least")
    assert table[0]["vs_zero_shot"] is None and table[0]["reading"] == ""


def test_a_row_without_predictions_is_not_paired_and_all_zero_says_so():
    zero, lora = _row("zero-shot", 50), _row("lora", 60)
    lora["predictions"] = None
    cmp = paired_comparisons("demo-c3", zero, [lora], _examples())
    assert "stored no test predictions" in cmp["lora"]["note"] and "vs_zero_shot_accuracy" not in cmp["lora"]
    assert "stored no test predictions" in table_rows(zero, [lora], cmp)[1]["reading"]
    zeros = [_row(m, 0, (0.0, 0.0)) for m in ("zero-shot", "lora", "full")]
    table = table_rows(zeros[0], zeros[1:], paired_comparisons("demo-c3", zeros[0], zeros[1:], _examples()))
    assert all("base is too weak" in r["reading"] for r in table)


def test_reuse_keys_change_with_what_shapes_the_result_and_only_that():
    from registry.tune_records import BaseVersion
    from tasks.config import TuneConfig
    from tasks.tune.keys import delta_key, examples_sha256, tune_settings, zero_shot_key

    base = BaseVersion("m", "models:/m/1", Path("m"), "ab" * 32)
    ex = _examples()[:20]
    data = examples_sha256({"train": ex})

    def key(tune=TuneConfig(), b=base, d=data, method="lora"):
        return delta_key(b, "demo-c3", d, method, tune_settings(tune, method))

    k = key()
    assert len(k) == 64 and k == key(TuneConfig())  # the same inputs: the same key
    other_ex = [dataclasses.replace(ex[0], input="changed"), *ex[1:]]
    changed = [key(TuneConfig(lr={"lora": 2e-3})), key(d=examples_sha256({"train": other_ex})),
               key(b=dataclasses.replace(base, checkpoint_sha256="cd" * 32)),
               key(b=dataclasses.replace(base, uri="models:/m/2")), key(method="full"),
               key(TuneConfig(method_params={"lora": {"r": 4}})), key(TuneConfig(sweep_lr=True))]
    assert len({k, *changed}) == 1 + len(changed)
    # what never shapes a lora delta: the task and method lists, the data folder (its examples are hashed), the
    # lr of another method
    assert key(TuneConfig(data="/elsewhere", lr={"full": 1e-2})) == k
    z = zero_shot_key(base, "demo-c3", data, TuneConfig())
    assert z != k and z == zero_shot_key(base, "demo-c3", data, TuneConfig(lr={"lora": 2e-3}))
    assert z != zero_shot_key(base, "demo-c3", data, TuneConfig(precision="fp32"))


def test_the_flow_takes_lists_checked_once_at_its_edge():
    """tune_flow's task and method lists go through TuneConfig (the one check): an unknown name fails before any
    run, naming the known ones; the tasks below never split or re-check."""
    from flows.tune import _config, tune_flow

    cfg = _config({"tune": {"tasks": "demo-c3"}}, ["demo-ccpm", "demo-c3"], None)
    assert cfg.tune.tasks == ["demo-ccpm", "demo-c3"] and cfg.tune.methods == ["lora", "full"]
    with pytest.raises(CpmantError, match="unknown delta method 'nope'") as e:
        tune_flow.fn("models:/m/1", ["demo-c3"], ["lora", "nope"])
    assert "lora" in e.value.fix
