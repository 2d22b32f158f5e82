"""The benchmarks' shared harness (bench/_common.py): one benchmark per file runs on it, so its pieces are checked
here without running any benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import _common  # noqa: E402

pytestmark = pytest.mark.unit


def test_one_benchmark_per_file():
    """The pretraining and registry scripts that held several benchmarks are gone; every bench_*.py has a main."""
    files = sorted(p.name for p in BENCH.glob("bench_*.py"))
    assert "bench_pretrain.py" not in files and "bench_registry.py" not in files
    for name in ("bench_train_step.py", "bench_tracking_overhead.py", "bench_mfu.py", "bench_encoding.py",
                 "bench_register.py", "bench_pull.py", "bench_compress.py", "bench_precision.py",
                 "bench_threads.py", "bench_generate.py"):
        text = (BENCH / name).read_text(encoding="utf-8")
        assert "run_benchmark(" in text, name
        assert len(text.splitlines()) < 320, f"{name} should hold one benchmark"


def test_core_finds_the_public_evaluate():
    from cpmant.training import evaluate as public

    assert _common.core("evaluate") is public.evaluate
    assert _common.core("loss_sums", "_loss_sums") is public.loss_sums
    with pytest.raises(ImportError):
        _common.core("no_such_function")
    assert _common.first_module("no_such_module_xyz", "cpmant.training.evaluate") is public


def test_interleave_warms_up_rotates_and_cleans_up():
    calls, cleaned = [], []
    peers = {"a": lambda: calls.append("a"), "b": (lambda: calls.append("b") or "r", cleaned.append)}
    secs = _common.interleave(peers, rounds=3, warmup=1)
    assert {k: len(v) for k, v in secs.items()} == {"a": 3, "b": 3}  # the warm-up round is not timed
    assert calls == ["b", "a", "a", "b", "b", "a", "a", "b"]  # the order rotates every round, warm-up included
    assert cleaned == ["r"] * 4
    assert _common.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_markdown_table():
    out = _common.markdown_table(("a", "value"), [("x", "1.0"), ("longer", "")])
    lines = out.splitlines()
    assert lines[0] == "| a      | value |"
    assert lines[1] == "|--------|-------|"
    assert lines[3] == "| longer |       |"


def test_run_benchmark_writes_json_with_load_average(tmp_path, capsys, monkeypatch):
    # run_benchmark points CPMANT_HOME at its own temporary home and installs a SIGTERM handler: undo both after
    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "outer"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(_common.signal, "signal", lambda *a: None)
    seen = {}

    def measure(args, mode, home, report):
        seen.update(mode=mode, home=home)
        with _common.recording_load(entry := {"figure": 1}):
            pass
        report["thing"] = entry

    modes = {"full": {"rounds": 9}, "quick": {"rounds": 2}}
    out = tmp_path / "r.json"
    rc = _common.run_benchmark("demo", "Demo benchmark.", modes, measure,
                               lambda r: _common.markdown_table(("figure",), [(r["thing"]["figure"],)]),
                               argv=["--quick", "--rounds", "3", "--out", str(out)])
    assert rc == 0
    assert seen["mode"] == {"rounds": 3}  # --quick, then the override
    assert not seen["home"].exists()  # the temporary home is removed
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["meta"]["mode"] == "quick" and data["meta"]["rounds"] == 3
    assert set(data["thing"]["load_average"]) == {"before", "after"}
    assert "load_average_start" in data["meta"] and "load_average_end" in data["meta"]
    assert "| figure |" in capsys.readouterr().out


def test_new_benchmarks_are_in_the_readme_table():
    readme = (BENCH / "README.md").read_text(encoding="utf-8")
    for name in ("bench_precision.py", "bench_threads.py", "bench_generate.py"):
        assert f"| `{name}` |" in readme, name


def test_generate_benchmark_tokenizer_reads_ids():
    import bench_generate

    tok = bench_generate.IdTokenizer()
    assert tok.encode("12 7 300") == [12, 7, 300]
    from cpmant.tokenizer import BOS_ID, EOS_ID

    assert (tok.bos_id, tok.eos_id) == (BOS_ID, EOS_ID)
