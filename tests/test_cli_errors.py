"""Every bad input through the console script's `main([...])`: exit code 2, one `error:` line, one `fix:` line and
no traceback. Table-driven; each case runs in a fresh CPMANT_HOME and needs no trained model."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.unit


def _files(tmp):
    """Paths some cases point at: a folder, a regular file, random bytes named like a CPM-Live checkpoint."""
    (tmp / "a-folder").mkdir(exist_ok=True)
    (tmp / "a-file").write_text("x")
    (tmp / "live").mkdir(exist_ok=True)
    (tmp / "live" / "random.pt").write_bytes(os.urandom(256))
    (tmp / "live" / "config.json").write_text(json.dumps({"dim_model": 32, "dim_ff": 64, "num_layers": 2,
                                                          "num_heads": 2, "dim_head": 16, "vocab_size": 600}))
    return {"folder": str(tmp / "a-folder"), "file": str(tmp / "a-file"), "random_pt": str(tmp / "live" / "random.pt"),
            "missing": str(tmp / "missing"), "out": str(tmp / "out")}


# (id, argv with {placeholders}, substring the error must contain (lower case), substring it must not contain)
CASES = [
    # issue 7: values that were silently replaced by defaults or ignored
    ("max-steps-0", ["pretrain", "--max-steps", "0"], "--max-steps", None),
    ("lifecycle-max-steps-0", ["lifecycle", "--max-steps", "0"], "--max-steps", None),
    ("nproc-0", ["pretrain", "--nproc", "0"], "--nproc", None),
    ("resume-empty", ["pretrain", "--resume", ""], "--resume", None),
    # issue 17 (bad input 13): a bad resume passed silently when the pretraining result was reused
    ("resume-missing-folder", ["pretrain", "--resume", "{missing}"], "neither auto, never nor a checkpoint", None),
    ("resume-sometimes", ["pretrain", "--resume", "sometimes"], "--resume 'sometimes' is neither", None),
    ("resume-not-a-checkpoint", ["pretrain", "--resume", "{folder}"], "is not a checkpoint folder", None),
    ("lifecycle-set-resume", ["lifecycle", "--set", "pretrain.resume=sometimes"], "pretrain.resume 'sometimes'",
     None),
    ("temperature-negative", ["generate", "models:/cpm-ant-tiny/1", "hi", "--temperature", "-1"], "temperature", None),
    ("top-p-2", ["generate", "models:/cpm-ant-tiny/1", "hi", "--top-p", "2"], "top_p", None),
    ("top-k-negative", ["generate", "models:/cpm-ant-tiny/1", "hi", "--top-k", "-5"], "top_k", None),
    ("precision-fp16", ["generate", "models:/cpm-ant-tiny/1", "hi", "--precision", "fp16"], "precision", None),
    # choices from the registries
    ("unknown-preset", ["pretrain", "--preset", "huge", "--max-steps", "1"], "unknown preset 'huge'", None),
    ("unknown-backend", ["pretrain", "--backend", "nope"], "nope", None),
    ("unknown-recipe", ["compress", "models:/cpm-ant-tiny/1", "--recipe", "nope"], "unknown recipe 'nope'", None),
    # issue 17: a repeated --set kept only the last one (the bad lr was silently dropped)
    ("set-repeated", ["pretrain", "--set", "pretrain.lr=abc", "--set", "tracking.country_iso_code=CHN"], "pretrain.lr",
     None),
    ("model-overrides-typo", ["pretrain", "--set", "pretrain.model_overrides.dim_modle=8"], "dim_modle", None),
    # config files
    ("config-is-a-folder", ["pretrain", "--config", "{folder}"], "folder", "does not exist"),
    ("config-missing", ["pretrain", "--config", "{missing}"], "does not exist", None),
    # raw tracebacks before (owned by the registry / core engineers; listed here so the CLI answers them all)
    ("lineage-empty", ["lineage", ""], "", None),
    ("serve-not-a-uri", ["serve", "foo"], "foo", None),
    ("serve-runs-uri", ["serve", "runs:/x"], "runs:/x", None),
    ("serve-port-99999", ["serve", "models:/cpm-ant-tiny/1", "--port", "99999"], "99999", None),
    ("serve-workers-0", ["serve", "models:/cpm-ant-tiny/1", "--workers", "0"], "workers", None),
    ("register-empty-name", ["register", "{folder}", "--name", ""], "name", None),
    ("register-slash-name", ["register", "{folder}", "--name", "a/b"], "name", None),
    ("convert-missing", ["convert", "{missing}", "{out}", "--to", "hf"], "does not exist", "cannot tell"),
    ("convert-random-pt", ["convert", "{random_pt}", "{out}", "--to", "cpmant"], "not a", "weights_only"),
    ("pull-to-a-file", ["pull", "models:/cpm-ant-tiny/1", "--to", "{file}"], "", None),
    # inference, delta tuning and validation verbs
    ("memory-budget-bad", ["generate", "models:/cpm-ant-tiny/1", "hi", "--memory-budget", "12QB"], "memory size", None),
    # issue 18: values checked once at the edge (force, precision, memory budget), each one error before any run
    ("memory-budget-zero", ["generate", "models:/cpm-ant-tiny/1", "hi", "--memory-budget", "0"], "not positive",
     None),
    ("lifecycle-force-unknown-stage", ["lifecycle", "--force", "pretrain", "nope"], "'nope'", None),
    ("pretrain-precision-fp16", ["pretrain", "--set", "pretrain.precision=fp16"], "pretrain.precision", None),
    ("lifecycle-precision-fp16", ["lifecycle", "--set", "compress.precision=half"], "compress.precision", None),
    ("tune-empty-task-list", ["tune", "models:/cpm-ant-tiny/1", "--task", ","], "no task given", None),
    ("device-cuda-without-cuda", ["generate", "models:/cpm-ant-tiny/1", "hi", "--device", "cuda"], "no cuda", None),
    ("device-tpu", ["generate", "models:/cpm-ant-tiny/1", "hi", "--device", "tpu"], "--device 'tpu'", None),
    ("bminf-without-cuda", ["generate", "models:/cpm-ant-tiny/1", "hi", "--backend", "bminf"], "CUDA", None),
    ("tune-unknown-task", ["tune", "models:/cpm-ant-tiny/1", "--task", "nope"], "nope", None),
    ("tune-unknown-method", ["tune", "models:/cpm-ant-tiny/1", "--task", "demo-ccpm", "--method", "nope"], "nope",
     None),
    ("tune-negative-lr", ["tune", "models:/cpm-ant-tiny/1", "--task", "demo-ccpm", "--set", "tune.lr.lora=-1"],
     "tune.lr.lora", None),
    ("tune-precision-fp16", ["tune", "models:/cpm-ant-tiny/1", "--task", "demo-ccpm", "--set", "tune.precision=fp16"],
     "tune.precision", None),
    ("tune-missing-model", ["tune", "models:/nope/1", "--task", "demo-ccpm"], "not in the registry", None),
    ("validate-not-a-uri", ["validate", "foo"], "foo", None),
    ("promote-no-reason", ["promote", "models:/cpm-ant-tiny/1", "--reason", ""], "reason", None),
    # issue 17 (bad inputs 1, 6, 7): champion moved by register; an unreachable Dask scheduler; unwritable outputs
    ("register-alias-champion", ["register", "{folder}", "--name", "x", "--alias", "champion"],
     "cpmant promote uri --reason text", None),
    ("dask-unreachable", ["pretrain", "--max-steps", "1", "--dask-address", "tcp://127.0.0.1:9"], "unreachable",
     None),
    ("report-out-under-a-file", ["report", "--out", "{file}/report.html"], "is a file", None),
    ("report-out-in-proc", ["report", "--out", "/proc/report.html"], "cannot be written", None),
    ("report-out-read-only", ["report", "--out", "/sys/fs/report.html"], "cannot be written", None),
    ("report-out-a-folder", ["report", "--out", "{folder}"], "is a folder", None),
    ("pull-to-read-only", ["pull", "models:/cpm-ant-tiny/1", "--to", "/sys/fs/pulled"], "cannot be written", None),
    ("pull-to-proc", ["pull", "models:/cpm-ant-tiny/1", "--to", "/proc/pulled"], "--to", None),
]


@pytest.mark.parametrize("argv,expect,forbid", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_and_one_fix(argv, expect, forbid, tmp_path, monkeypatch, capfd):
    from cpmant_cli.main import main

    files = _files(tmp_path)
    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = main([a.format(**files) for a in argv])
    out, err = capfd.readouterr()
    text = out + err
    assert rc == 2, text
    lines = err.strip().splitlines()
    assert sum(ln.startswith("error:") for ln in lines) == 1, err
    assert sum(ln.startswith("fix:") for ln in lines) == 1, err
    assert "Traceback" not in text
    assert expect.lower() in err.lower()
    if forbid:
        assert forbid.lower() not in err.lower()


def test_unreachable_prefect_api_is_one_error(monkeypatch, capfd, tmp_path):
    """Before: Prefect's retries and a 110-line traceback. Now: /health is asked first."""
    from cpmant_cli.main import main

    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    rc = main(["pretrain", "--max-steps", "1"])
    err = capfd.readouterr().err
    assert rc == 2
    assert "Prefect API at http://127.0.0.1:9/api" in err and "unreachable" in err and "PREFECT_API_URL" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_cli_choices_come_from_the_registries(capsys):
    """No literal lists in the CLI: presets, recipes and backends in the help are the registered ones."""
    from cpmant.backends import BACKENDS, register_backend
    from cpmant.config import PRESETS
    from cpmant.compress.recipe import recipe_names
    from cpmant_cli.main import build_parser

    register_backend("train", "test-only-backend", "registered by a test")(lambda: None)
    try:
        parser = build_parser()
        with pytest.raises(SystemExit):
            parser.parse_args(["pretrain", "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(name in text for name in PRESETS)
        assert "test-only-backend" in text
        with pytest.raises(SystemExit):
            parser.parse_args(["compress", "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(name in text for name in recipe_names())
    finally:
        BACKENDS["train"].pop("test-only-backend", None)


def test_force_is_a_set_of_stages_made_once_at_the_edge():
    """`--force` becomes the set of stages to rerun in one place (common.force_of -> flows.config.check_force)."""
    from cpmant.errors import CpmantError
    from cpmant_cli.common import force_of
    from cpmant_cli.main import build_parser
    from flows.config import STAGES, check_force, forced

    def force(*argv):
        return force_of(build_parser().parse_args(list(argv)))

    assert force("lifecycle") == frozenset()
    assert force("lifecycle", "--force") == frozenset(STAGES)  # alone: every stage
    assert force("lifecycle", "--force", "tune", "compress", "tune") == {"compress", "tune"}
    assert force("pretrain", "--force") == frozenset(STAGES) and force("pretrain") == frozenset()
    # what a flow's entry point accepts (the CLI's list, a deployment's bool or list, a set)
    assert check_force(["tune"]) == check_force({"tune"}) == check_force("tune") == frozenset({"tune"})
    assert check_force(None) == check_force(False) == frozenset()
    assert forced(frozenset({"tune"}), "tune") and not forced(frozenset({"tune"}), "compress")
    with pytest.raises(CpmantError, match="--force nope: no such stage") as e:
        check_force(["tune", "nope"])
    assert all(s in e.value.fix for s in STAGES)


def test_memory_budget_is_parsed_once_into_a_type():
    from cpmant.errors import CpmantError
    from cpmant.memory import MemoryBudget

    assert MemoryBudget.parse(None) is None  # no budget: every layer resident
    assert MemoryBudget.parse("64MB") == MemoryBudget(64 * 2**20, "64MB")
    assert MemoryBudget.parse("1.5GB").bytes == 3 * 2**29 and MemoryBudget.parse(4096).bytes == 4096
    for bad, why in (("12QB", "cannot read the memory size '12QB'"), ("0", "not positive")):
        with pytest.raises(CpmantError, match=why) as e:
            MemoryBudget.parse(bad)
        assert e.value.fix


def test_verb_modules_never_import_main():
    """No cycle main <-> verb modules: a verb module takes the shared steps from common.py."""
    import ast
    from pathlib import Path

    import cpmant_cli

    for path in Path(cpmant_cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert not (node.level == 1 and node.module == "main"), path.name
                assert node.module != "cpmant_cli.main", path.name
            if isinstance(node, ast.Import):
                assert all(a.name not in ("mlflow", "cpmant_cli.main") and not a.name.startswith("mlflow.")
                           for a in node.names), path.name
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "mlflow", path.name


def test_generate_defaults_come_from_generation_config():
    from cpmant.generation_config import GenerationConfig
    from cpmant_cli.generate_cmd import _generation_config
    from cpmant_cli.main import build_parser

    args = build_parser().parse_args(["generate", "models:/x/1", "hi"])
    assert _generation_config(args) == GenerationConfig()
    args = build_parser().parse_args(["generate", "models:/x/1", "hi", "--top-k", "5", "--temperature", "0.7"])
    assert _generation_config(args) == GenerationConfig(top_k=5, temperature=0.7)


def test_max_steps_reaches_the_config():
    """`--max-steps 1` used to be dropped only when 0 (falsy); every given flag now reaches the config."""
    from cpmant_cli.common import stage_overrides
    from cpmant_cli.main import build_parser

    args = build_parser().parse_args(["pretrain", "--max-steps", "1", "--nproc", "1", "--resume", "never"])
    assert stage_overrides(args)["pretrain"] == {"max_steps": 1, "nproc": 1, "resume": "never"}


def test_deterministic_errors_are_not_retried():
    """A CpmantError (bad corpus) fails its task at once; other errors may be retried."""
    from prefect.states import Failed

    from cpmant.errors import CpmantError
    from tasks.pretrain import prepare_corpus
    from tasks.metering import retry_transient

    assert prepare_corpus.retry_condition_fn is retry_transient
    assert retry_transient(None, None, Failed(data=CpmantError("bad corpus", "fix it"))) is False
    assert retry_transient(None, None, Failed(data=OSError("network"))) is True


def test_forked_workers_get_the_default_sigterm():
    """Pool workers forked during a flow must not inherit Prefect's SIGTERM bridge (TerminationSignal tracebacks)."""
    import signal

    from tasks.metering import default_sigterm

    def bridge(*_):
        raise RuntimeError("bridge")

    old = signal.signal(signal.SIGTERM, bridge)
    try:
        with default_sigterm():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is bridge
    finally:
        signal.signal(signal.SIGTERM, old)


def test_prefect_console_hides_cpmant_errors_only():
    import logging

    from cpmant.errors import CpmantError
    from cpmant_cli.env import _HideCpmantErrors

    f = _HideCpmantErrors()

    def rec(name, msg, exc=None):
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, (type(exc), exc, None) if exc else None)

    assert not f.filter(rec("prefect.task_runs", "Task run failed", CpmantError("bad", "fix")))
    assert not f.filter(rec("prefect.flow_runs", "Finished in state Failed('... CpmantError: bad')"))
    assert not f.filter(rec("prefect.flow_runs", "Crash detected! Execution was aborted by an interrupt signal."))
    assert f.filter(rec("prefect.task_runs", "Task run failed", RuntimeError("a bug")))
    assert f.filter(rec("prefect.flow_runs", "Finished in state Completed()"))


def test_summary_table():
    from cpmant_cli.common import format_summary

    text = format_summary([
        {"stage": "pretrain", "model": "models:/cpm-ant-tiny/1", "metric": "valid_loss", "value": 3.1234,
         "seconds": 12.34, "reused": True, "note": ""},
        {"stage": "compress 3b", "model": "models:/cpm-ant-tiny-3b/1", "metric": "lm_loss", "value": 3.2,
         "seconds": 40.0, "reused": False, "note": "+2.5% vs parent"},
    ])
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "model", "key", "metric", "time", "reused"]
    assert "valid_loss 3.123" in lines[2] and lines[2].rstrip().endswith("yes")
    assert "+2.5% vs parent" in lines[3] and lines[3].rstrip().endswith("no")


def test_ctrl_c_names_the_running_lifecycle_stage(capsys):
    """Issue 17 (bad input 13): Ctrl+C in the lifecycle's tune stage printed the pretraining checkpoint hint."""
    from types import SimpleNamespace

    from cpmant_cli.main import EXIT_INTERRUPTED, _interrupted, interrupt_lines

    tune = interrupt_lines("tune", "/runs/r1", True)
    assert tune[0] == "interrupted: stopped by Ctrl+C during the tune stage"
    assert "stages finished before tune are reused" in tune[1] and "tune starts over" in tune[1]
    assert "/runs/r1" not in " ".join(tune) and "--resume" not in " ".join(tune)
    for stage in ("pretrain", None):  # the lifecycle in pretraining, or `cpmant pretrain` itself
        lines = interrupt_lines(stage, "/runs/r1", True)
        assert "/runs/r1/checkpoints" in lines[1] and "--resume auto" in lines[1]
    assert interrupt_lines(None, None, False) == ["interrupted: stopped by Ctrl+C"]  # a verb with nothing to resume

    args = SimpleNamespace(interrupt_hint=lambda: "/runs/r1", interrupt_stage=lambda: "validate")
    assert _interrupted(args) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "during the validate stage" in err and "/runs/r1/checkpoints" not in err


def test_the_lifecycle_records_its_running_stage():
    """The stage `cpmant lifecycle` reports on Ctrl+C is the one whose flow was interrupted."""
    from flows.config import LifecycleConfig
    from flows.lifecycle import StageFlows, run_lifecycle, running_stage

    class NoRecord:  # no MLflow runs, no pins
        open = staticmethod(lambda *a, **k: "run-id")
        close = pin = staticmethod(lambda *a, **k: None)

    def done(*a, **k):
        return {"model_uri": "models:/m/1", "variants": [], "summary": []}

    def interrupted(*a, **k):  # pretrain and compress finish; Ctrl+C arrives during tune
        raise KeyboardInterrupt

    flows = StageFlows(pretrain=done, compress=done, tune=interrupted, validate=done, report=done)
    with pytest.raises(KeyboardInterrupt):
        run_lifecycle(LifecycleConfig(), False, flows, NoRecord(), runner=lambda flow, orch: flow)
    assert running_stage() == "tune"
