"""The compression stage end to end: `compress --recipe all,int8` on a registered micro base registers the
variants with lineage and a description, their sizes follow their recipes, losses are measured (metrics at the last
distillation step; the published figure a param), the ladder table is written, the int8 variant generates through
the CLI, and a rerun returns the existing versions unless an input changed or `force` is given: one reuse key per
variant decides, and the summary says why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MICRO_MODEL, registered_micro_model

pytestmark = pytest.mark.flow
CLI = str(Path(sys.executable).with_name("cpmant"))


def closed_form_params(c) -> int:
    att, ffn = c.kept()
    d, hd = c.dim_model, c.num_heads * c.dim_head
    emb = (c.vocab_size + c.prompt_types * c.prompt_length + c.segment_types) * d
    pos = (c.segment_types ** 2 + c.position_bias_num_buckets) * c.num_heads
    return emb + pos + d + att * (d + 4 * d * hd) + ffn * (d + 3 * d * c.dim_ff)


@pytest.fixture(scope="module")
def base(tmp_path_factory, fixture_corpus):
    home = tmp_path_factory.mktemp("compress_home")
    mp, _, reg = registered_micro_model(home, fixture_corpus, {**MICRO_MODEL, "num_layers": 4, "num_heads": 4,
                                                               "dim_ff": 96},
                                        micro_batch_size=8, max_steps=30, warmup_steps=4, lr=0.05, eval_rows=8,
                                        valid_fraction=0.25)
    yield {"home": home, "uri": reg.uri, "corpus": str(fixture_corpus)}
    mp.undo()


def test_compress_all_and_int8(prefect_harness, base):
    import mlflow
    from mlflow.tracking import MlflowClient

    from cpmant.checkpoint import load_model_dir
    from cpmant.compress.recipe import PUBLISHED_LABEL, RECIPES
    from flows.compress import compress_flow
    from registry.pulling import checkpoint_dir

    cfg = {"compress": {"distill_steps": 8, "distill_batch_size": 4, "importance_rows": 8,
                        "batch_size": 4, "gen_tokens": 4, "gen_repeats": 1},
           "tracking": {"measure_power_secs": 1}}
    out = compress_flow("models:/cpm-ant-tiny@candidate", "all,int8", cfg)
    names = ["7b", "3b", "1b", "300m", "int8"]
    assert out["variants"] == [f"models:/cpm-ant-tiny-{n}/1" for n in names]

    client = MlflowClient()
    parent_cfg, parent_sd, _, _ = load_model_dir(checkpoint_dir(base["uri"]))
    parent_bytes = (checkpoint_dir(base["uri"]) / "model.safetensors").stat().st_size
    ladder = {r["model"]: r for r in out["ladder"]}
    for n in names:
        uri = f"models:/cpm-ant-tiny-{n}/1"
        mv = client.get_model_version(f"cpm-ant-tiny-{n}", "1")
        assert mv.tags["cpmant.stage"] == "compress" and mv.tags["cpmant.parent"] == base["uri"]
        assert mv.tags["cpmant.lineage"].startswith(f"{uri} <- {base['uri']} <- data:")
        cfg_v, sd, _, meta = load_model_dir(checkpoint_dir(uri))
        row = ladder[uri]
        run = client.get_run(mv.run_id)
        for key in ("lm_loss", "loss_increase", "params", "bytes_on_disk", "generation_tokens_per_second",
                    "energy_kwh", "emissions_kg_co2e", "cost_rmb", "duration_s"):
            assert key in run.data.metrics, (n, key)
        # a reference figure is a param, never a metric; final values sit at the last distillation step
        assert "published_loss_increase" not in run.data.metrics
        last = 0 if n == "int8" else 8
        assert [m.step for m in client.get_metric_history(run.info.run_id, "lm_loss")] == [last]
        assert meta["data"]["corpus"] == str(Path(base["corpus"]).resolve())  # the parent's data, carried forward
        assert mv.description.startswith(f"{n} recipe of {base['uri']}: ") and "M parameters, loss " in mv.description
        if n == "int8":
            assert "int8 weights" in mv.description and "compress.importance_rows" not in run.data.params
            assert not [k for k in run.data.params if k.startswith(("prune.", "distill."))]
            assert cfg_v.quantization == "int8"
            assert row["bytes_on_disk"] < 0.6 * parent_bytes  # int8 encoder weights; embeddings stay fp32
            continue
        assert float(run.data.params["recipe.published_loss_increase"]) == pytest.approx(
            RECIPES[n].published_loss_increase)
        assert run.data.params["distill.steps"] == "8" and "compress.importance_rows" in run.data.params
        shape = RECIPES[n].target_shape(parent_cfg)
        assert cfg_v.kept() == (shape["att_layers"], shape["ffn_layers"])
        assert (cfg_v.num_heads, cfg_v.dim_ff) == (shape["num_heads"], shape["dim_ff"])
        assert row["params"] == closed_form_params(cfg_v) == sum(t.numel() for t in sd.values())
        # the file is smaller in proportion to the parameters (fp32 either way, small header)
        assert row["bytes_on_disk"] / parent_bytes == pytest.approx(row["params"] / closed_form_params(parent_cfg),
                                                                     rel=0.02)
        assert meta["report"]["distill"]["final_loss"] < meta["report"]["distill"]["first_loss"]
    sizes = [ladder[f"models:/cpm-ant-tiny-{n}/1"]["params"] for n in ("7b", "3b", "1b", "300m")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < closed_form_params(parent_cfg)

    runs = mlflow.search_runs(filter_string="attributes.run_name = 'compress-ladder'", output_format="list")
    assert runs and any(a.path == "ladder.json" for a in client.list_artifacts(runs[0].info.run_id))
    table = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id,
                                                                artifact_path="ladder.json")).read_text())
    assert PUBLISHED_LABEL in table["columns"] and "published_loss_increase" not in table["columns"]

    p = subprocess.run([CLI, "generate", "models:/cpm-ant-tiny-int8/1", "床前明月光", "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith("床前明月光")

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        names = {t.name for t in pc.read_task_runs()}
    assert {"compress-3b", "compress-int8"} <= names  # task runs named by what they do

    # a rerun with the same inputs returns the existing version: no new run, no new version
    def runs(name):
        return len(mlflow.search_runs(filter_string=f"attributes.run_name = '{name}'", output_format="list"))

    # the one reuse key: on the version, in the variant's metadata, computed from the parent's recorded sha256
    from cpmant.compress.config import CompressConfig
    from cpmant.compress.pipeline import variant_key

    key = client.get_model_version("cpm-ant-tiny-3b", "1").tags["cpmant.inputs_sha256"]
    parent_sha = client.get_model_version("cpm-ant-tiny", "1").tags["cpmant.checkpoint_sha256"]
    assert load_model_dir(checkpoint_dir("models:/cpm-ant-tiny-3b/1"))[3]["config_sha256"] == key
    parent_dir, settings = checkpoint_dir(base["uri"]), CompressConfig(**cfg["compress"])
    assert variant_key(parent_dir, RECIPES["3b"], settings, parent_uri=base["uri"],
                       parent_checkpoint_sha256=parent_sha).config_sha256 == key
    for other in ({"parent_uri": "models:/cpm-ant-tiny/2", "parent_checkpoint_sha256": parent_sha},
                  {"parent_uri": base["uri"], "parent_checkpoint_sha256": "0" * 64}):
        assert variant_key(parent_dir, RECIPES["3b"], settings, **other).config_sha256 != key, other

    before = runs("compress-3b")
    again = compress_flow("models:/cpm-ant-tiny@candidate", "3b", cfg)
    assert again["variants"] == ["models:/cpm-ant-tiny-3b/1"] and runs("compress-3b") == before
    assert again["ladder"][1]["lm_loss"] == pytest.approx(ladder["models:/cpm-ant-tiny-3b/1"]["lm_loss"])
    assert again["summary"][0]["reused"] is True
    assert again["summary"][0]["reason"] == f"compress 3b: reused models:/cpm-ant-tiny-3b/1: same key {key[:12]}"
    # a deleted version is not found: made anew, from the finished variant on disk (same key: not measured again)
    client.delete_model_version("cpm-ant-tiny-3b", "1")
    remade = compress_flow("models:/cpm-ant-tiny@candidate", "3b", cfg)
    assert remade["variants"] == ["models:/cpm-ant-tiny-3b/2"] and runs("compress-3b") == before + 1
    assert remade["summary"][0]["reason"] == f"compress 3b: made anew: no result of cpm-ant-tiny-3b has key {key[:12]}"
    first_3b = ladder["models:/cpm-ant-tiny-3b/1"]
    assert remade["ladder"][1]["generation_tokens_per_second"] == first_3b["generation_tokens_per_second"]  # a timing
    assert client.get_model_version("cpm-ant-tiny-3b", "2").tags["cpmant.inputs_sha256"] == key
    # an input that changes only the reported numbers (generation speed's length) makes a new version, as does force
    cfg2 = {**cfg, "compress": {**cfg["compress"], "gen_tokens": cfg["compress"].get("gen_tokens", 32) + 1}}
    changed = compress_flow("models:/cpm-ant-tiny@candidate", "int8", cfg2)
    assert changed["variants"] == ["models:/cpm-ant-tiny-int8/2"]
    assert changed["summary"][0]["reason"].startswith(
        "compress int8: made anew: no result of cpm-ant-tiny-int8 has key")
    forced = compress_flow("models:/cpm-ant-tiny@candidate", "int8", cfg2, force=True)
    assert forced["variants"] == ["models:/cpm-ant-tiny-int8/3"]
    assert forced["summary"][0]["reason"].startswith("compress int8: made anew: --force compress")
