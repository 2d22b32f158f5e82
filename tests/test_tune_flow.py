"""The delta-tuning stage end to end on a micro base: `cpmant tune` with lora and full on demo-ccpm (built from the
fixture corpus) registers `<model>-<task>-<method>` versions tagged stage=delta with their base as parent, the lora
version holds only the delta's weights, the runs log trainable_params / trainable_ratio / delta_bytes / eval_<metric>
per epoch / energy, the comparison table is an MLflow table and a Prefect artifact, a rerun reuses the versions
(same reuse key: no new run or version, the reason said), another lr or other task data makes a new version,
`cpmant lineage` shows corpus -> base -> delta, and a bad task or method is refused before any flow starts."""

from __future__ import annotations

import json

import pytest

from conftest import registered_micro_model
from registry import tags as T

pytestmark = pytest.mark.flow
TASK = "demo-ccpm"
# one epoch on a few examples: the stage's wiring is under test, not the scores
SETTINGS = ["tune.epochs=2", "tune.max_train_examples=8", "tune.max_eval_examples=4", "tune.batch_size=4",
            "tune.patience=0", "tracking.measure_power_secs=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, fixture_corpus):
    home = tmp_path_factory.mktemp("tune_home")
    mp, _, reg = registered_micro_model(home, fixture_corpus)
    yield {"home": home, "uri": reg.uri, "corpus": str(fixture_corpus)}
    mp.undo()


def _tune(base, capsys, *extra) -> dict:
    from cpmant_cli.main import main

    rc = main(["tune", "models:/cpm-ant-tiny@candidate", "--task", TASK, "--method", "lora,full",
               "--data", base["corpus"], "--json", "--set", *SETTINGS, *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_tune_registers_deltas_with_lineage_metrics_and_table(prefect_harness, base, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    from cpmant.delta.methods import LoraParams
    from registry.ancestry import format_lineage, lineage
    from registry.pulling import checkpoint_dir

    out = _tune(base, capsys)
    names = [f"cpm-ant-tiny-{TASK}-{m}" for m in ("lora", "full")]
    assert out["deltas"] == [f"models:/{n}/1" for n in names]
    client = MlflowClient()
    base_bytes = (checkpoint_dir(base["uri"]) / "model.safetensors").stat().st_size
    micro = {"layers": 2, "dim_model": 32, "heads_x_dim": 2 * 16}
    for name, method in zip(names, ("lora", "full")):
        mv = client.get_model_version(name, "1")
        t = mv.tags
        assert (t["cpmant.stage"], t["cpmant.parent"], t["cpmant.task"], t["cpmant.method"]) == (
            "delta", base["uri"], TASK, method)
        assert t["cpmant.inputs_sha256"] and t["cpmant.checkpoint_sha256"] and "candidate" in mv.aliases
        folder = checkpoint_dir(f"models:/{name}/1")
        run = client.get_run(mv.run_id)
        m = run.data.metrics
        for key in ("trainable_params", "trainable_ratio", "delta_bytes", "test_f1", "energy_kwh",
                    "emissions_kg_co2e", "cost_rmb", "duration_s"):
            assert key in m, (name, key)
        # eval_<metric> once per epoch, at step = epoch, from epoch 0 (the untuned start, kept when best)
        assert [h.step for h in client.get_metric_history(run.info.run_id, "eval_f1")] == [0, 1, 2]
        # the micro base has 128 positions: CPM-Live's 256 for CCPM is capped, and the run says so
        assert (run.data.params["max_len"], run.data.params["max_len_effective"]) == ("256", "128")
        assert run.data.params["task"] == TASK and run.data.params["method"] == method
        # the contract's hashes: the data it was tuned on (the task's examples) and its tuning config
        assert t["cpmant.data_sha256"] == run.data.params["task_data_sha256"] and t["cpmant.config_sha256"]
        if method == "lora":
            # only the delta: A and B of project_q and project_v in each layer, r=8 (CPM-Ant's recipe)
            assert not (folder / "model.safetensors").exists()
            with safe_open(str(folder / "delta.safetensors"), "pt") as f:
                keys = sorted(f.keys())
            assert len(keys) == micro["layers"] * 2 * 2 and all(".lora." in k for k in keys)
            r = LoraParams().r
            want = micro["layers"] * 2 * (r * micro["dim_model"] + micro["heads_x_dim"] * r)
            assert m["trainable_params"] == want
            assert m["delta_bytes"] == (folder / "delta.safetensors").stat().st_size < base_bytes / 5
            assert t["cpmant.checkpoint_sha256"] == t["cpmant.file_sha256.delta.safetensors"]
        else:
            assert m["trainable_ratio"] == 1.0 and abs(m["delta_bytes"] - base_bytes) < 0.01 * base_bytes

    # the comparison table: zero-shot, lora, full on the test split; MLflow table + Prefect artifact
    table = out["tables"][TASK]
    assert [r["method"] for r in table] == ["zero-shot", "lora", "full"]
    assert table[0]["model"] == base["uri"] and [r["model"] for r in table[1:]] == out["deltas"]
    for row in table[1:]:
        name, version = row["model"][len("models:/"):].rsplit("/", 1)
        assert row["score"] == client.get_run(client.get_model_version(name, version).run_id).data.metrics["test_f1"]
    # every score carries its interval; each run stores its test predictions (4 examples) for paired comparisons
    runs_by_method = {r["method"]: client.get_run(client.get_model_version(*r["model"][len("models:/"):]
                                                                           .rsplit("/", 1)).run_id)
                      for r in table[1:]}
    for row in table:
        assert row["score_ci_low"] <= row["score"] <= row["score_ci_high"]
    zero_run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.`cpmant.tune.kind` = 'zero-shot'")[0]
    for run in (zero_run, *runs_by_method.values()):
        m = run.data.metrics
        assert m["test_f1_ci_low"] <= m["test_f1"] <= m["test_f1_ci_high"] and "test_accuracy_ci_high" in m
        lines = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/predictions/test.jsonl").splitlines()
        assert len(lines) == 4 and all(json.loads(x)["prediction"] in range(4) for x in lines)
    # paired comparisons on the method runs and (prefixed by the method) on the comparison run
    lora_m, full_m = runs_by_method["lora"].data.metrics, runs_by_method["full"].data.metrics
    assert lora_m["vs_zero_shot_f1"] == pytest.approx(table[1]["vs_zero_shot"])
    assert lora_m["vs_full_f1"] == pytest.approx(table[1]["score"] - table[2]["score"])
    assert lora_m["vs_full_f1_ci_low"] <= lora_m["vs_full_f1"] <= lora_m["vs_full_f1_ci_high"]
    assert "ratio_to_full_f1_ci_low" in lora_m and "vs_full_f1" not in full_m and "vs_zero_shot_f1" in full_m
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`cpmant.tune.kind` = 'comparison' and tags.`cpmant.task` = '{TASK}'")
    assert len(runs) == 1
    logged = mlflow.load_table(f"comparison-{TASK}.json", run_ids=[runs[0].info.run_id])
    assert list(logged["method"]) == ["zero-shot", "lora", "full"]
    assert {"score_ci_low", "vs_full_ci_low", "ratio_to_full_ci_high"} <= set(logged.columns)
    assert runs[0].data.metrics["lora_vs_full_f1"] == pytest.approx(lora_m["vs_full_f1"])
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts()
    assert any(a.key == f"tune-{TASK}" and a.type == "table" for a in arts)

    # lineage: corpus -> base -> delta, with the delta's task and method
    chain = lineage(out["deltas"][0])
    assert [c["role"] for c in chain] == ["delta", "base"]
    text = format_lineage(chain)
    first = text.splitlines()[0]
    assert first == (f"corpus data:{chain[-1]['data_sha256'][:16]} -> base {base['uri']} -> delta "
                     f"{out['deltas'][0]} (task {TASK}, method lora)")

    # a rerun with the same inputs returns the same versions, without new runs or versions, and says why (the one
    # reuse rule: the same key); MLflow pointed nowhere first, as in a fresh `cpmant tune` process (the tune tasks
    # find the store themselves)
    n_runs = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    mlflow.set_tracking_uri(None)
    again = _tune(base, capsys)
    assert again["deltas"] == out["deltas"] and all(r["reused"] for r in again["summary"])
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == n_runs
    assert [len(client.search_model_versions(f"name = '{n}'")) for n in names] == [1, 1]
    keys = [client.get_model_version(n, "1").tags[T.INPUTS_SHA256] for n in names]
    reasons = [r["reason"] for r in again["summary"]]
    assert reasons[0].startswith(f"tune zero-shot {TASK}: reused runs:/{zero_run.info.run_id}: same key ")
    assert reasons[1:] == [f"tune {TASK} {m}: reused {u}: same key {k[:12]}"
                           for m, u, k in zip(("lora", "full"), out["deltas"], keys)]
    assert zero_run.data.tags[T.INPUTS_SHA256] and zero_run.data.tags[T.TASK_DATA_SHA256]


def test_a_changed_lr_or_task_data_is_tuned_anew(prefect_harness, base, capsys, tmp_path):
    """The same tune with another lr, or on other task examples, finds no version with its key: a new version."""
    import shutil

    from mlflow.tracking import MlflowClient

    from cpmant_cli.main import main

    name = f"cpm-ant-tiny-{TASK}-lora"
    corpus = shutil.copytree(base["corpus"], tmp_path / "corpus")
    poems = corpus / "poems.txt"
    poems.write_text("\n".join(poems.read_text(encoding="utf-8").splitlines()[::-1]) + "\n", encoding="utf-8")
    made = []
    for data, extra in ((base["corpus"], ["tune.lr.lora=2e-3"]), (str(corpus), [])):
        before = {v.version for v in MlflowClient().search_model_versions(f"name = '{name}'")}
        rc = main(["tune", "models:/cpm-ant-tiny@candidate", "--task", TASK, "--method", "lora", "--data", data,
                   "--json", "--set", *SETTINGS, *extra])
        out = capsys.readouterr()
        assert rc == 0, out.err
        row = json.loads(out.out)["summary"][1]
        after = {v.version for v in MlflowClient().search_model_versions(f"name = '{name}'")}
        assert not row["reused"] and len(after - before) == 1
        assert row["model"] == f"models:/{name}/{(after - before).pop()}"
        assert row["reason"].startswith(f"tune {TASK} lora: made anew: no result of {name} has key ")
        made.append(row["model"])
    tags = [MlflowClient().get_model_version(*u[len("models:/"):].rsplit("/", 1)).tags
            for u in (f"models:/{name}/1", *made)]
    # the lr version was tuned on the same examples, the other on other examples
    data = [t[T.TASK_DATA_SHA256] for t in tags]
    assert data[0] == data[1] != data[2] and len({t[T.INPUTS_SHA256] for t in tags}) == 3


def test_sweep_lr_records_the_grid_the_choice_and_the_sweep(prefect_harness, base, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from cpmant_cli.main import main

    rc = main(["tune", "models:/cpm-ant-tiny@candidate", "--task", TASK, "--method", "lora", "--sweep-lr",
               "--data", base["corpus"], "--json", "--set", *SETTINGS, "tune.lr_grid.lora=[1e-4,3e-2]"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    client = MlflowClient()
    name = f"cpm-ant-tiny-{TASK}-lora"
    # the grid is part of the reuse key: not the version tuned at the default lr (if that test ran first)
    uri = json.loads(out.out)["deltas"][0]
    run = client.get_run(client.get_model_version(name, uri.rsplit("/", 1)[1]).run_id)
    p = run.data.params
    assert json.loads(p["lr_grid"]) == [1e-4, 3e-2] and json.loads(p["tune.lr_grid"].replace("'", '"')) == [1e-4, 3e-2]
    sweep = mlflow.load_table("lr_sweep.json", run_ids=[run.info.run_id])
    assert list(sweep["lr"]) == [1e-4, 3e-2] and set(sweep["best_epoch"]) <= {0, 1, 2}
    best = sweep.loc[sweep["valid_score"].idxmax()]  # the first of equals, as the sweep chooses
    assert float(p["lr_chosen"]) == best["lr"] == float(p["method.lr"])
    # only the chosen lr's run is logged: one eval_f1 per epoch, from 0, ending at its best valid score
    hist = sorted(client.get_metric_history(run.info.run_id, "eval_f1"), key=lambda h: h.step)
    assert [h.step for h in hist] == [0, 1, 2] and max(h.value for h in hist) == pytest.approx(best["valid_score"])


@pytest.mark.parametrize("flag,value,listed", [("--task", "demo-nope", "demo-ccpm"),
                                               ("--method", "lora,nope", "lora")])
def test_unknown_task_or_method_lists_the_known_ones(flag, value, listed, capsys, monkeypatch, tmp_path):
    from cpmant_cli import main as cli

    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    # a flow that started would ask this unreachable API first and fail on it: the names are refused before
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    rc = cli.main(["tune", "models:/cpm-ant-tiny/1", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and "Prefect API" not in err
    assert err.startswith("error: unknown ") and "nope" in err and listed in err.splitlines()[1]
