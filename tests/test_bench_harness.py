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
    # run_benchmark points CPMANT_HOME at its own temporary home (the environment is restored after) and turns
    # SIGTERM into SystemExit while it runs (its handler then put back)
    import signal

    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "outer"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def measure(args, mode, home, report):
        seen.update(mode=mode, home=home, handler=signal.getsignal(signal.SIGTERM))
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
    assert seen["handler"] is not before and signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(SystemExit), _common.sigterm_exits():
        signal.raise_signal(signal.SIGTERM)  # a plain `kill` while a benchmark runs: SystemExit, so `finally` runs
    assert signal.getsignal(signal.SIGTERM) is before
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


# ---- bench/_limits.py: the machine's limits beside every figure ------------------------------------------------
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 avx512vl
bugs\t\t: sysret_ss_attrs
"""


def test_cpu_flag_parser_keeps_the_flags_of_interest_in_order():
    import _limits

    assert _limits.parse_cpu_flags(CPUINFO) == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
                                                "amx_bf16"]
    assert _limits.parse_cpu_flags("flags\t: sse sse2 avx\n") == []  # no AVX2: nothing of interest
    assert _limits.parse_cpu_flags("processor : 0\n") == []  # no flags line
    assert set(_limits.cpu_flags()) <= set(_limits.FLAGS_OF_INTEREST)


def test_last_level_cache_is_the_highest_data_level(tmp_path):
    import _limits

    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                             (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert _limits.last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert _limits.last_level_cache_bytes(tmp_path / "missing") is None
    assert _limits.parse_size("2M") == 2 * 2**20 and _limits.parse_size("512") == 512
    with pytest.raises(ValueError):
        _limits.parse_size("lots")


def test_bandwidth_and_peak_are_positive_and_finite():
    import math

    import _limits

    bw = _limits.read_bandwidth(nbytes=64 * 2**20, seconds=0.05)
    peak = _limits.matmul_peak("fp32", seconds=0.05)
    assert math.isfinite(bw) and bw > 1e8  # any machine reads over 100 MB/s
    assert math.isfinite(peak) and peak > 1e8


def test_roofline_arithmetic():
    import torch

    import _limits

    lin = torch.nn.Linear(4, 3)  # 12 fp32 weights + 3 fp32 biases = 60 bytes
    lin.register_buffer("q", torch.zeros(3, 4, dtype=torch.int8))  # + 12 bytes
    assert _limits.weight_bytes(lin) == 72
    tied = torch.nn.Module()
    tied.a = torch.nn.Embedding(10, 4)
    tied.b = torch.nn.Linear(4, 10, bias=False)
    tied.b.weight = tied.a.weight  # a tied projection is read once
    assert _limits.weight_bytes(tied) == 160
    # the d512-l8: 126 MB of weights per token at 25 GB/s -> 198.4 tokens/s; 76 tokens/s is 38% of it
    roof = _limits.roofline_tokens_per_s(126e6, 25e9)
    assert roof == pytest.approx(198.41, abs=0.01)
    assert 76 / roof == pytest.approx(0.383, abs=0.001)
    # 100 tokens/s against a 200 tokens/s roofline: 5 ms of the 10 ms per token is above the roofline
    assert _limits.overhead_per_token_s(100.0, 200.0) == pytest.approx(0.005)


def test_generate_limits_and_summary_row():
    """The issue's d512-l8 figures: 76 tokens/s fp32 and 114 int8 at 25 GB/s over 126 / 44 MB of weights."""
    import _limits
    import bench_generate

    dec = {"ours_fp32": 76.0, "ours_int8": 114.0, "hf_fp32": 60.0}
    r = {"config": "d512-l8", "decode_tokens_per_s": dec, "decode_tokens_per_s_fastest": dec,
         "load_average": {"before": [1.0], "after": [1.5]}}
    bench_generate.add_limits(r, "d512-l8", {"fp32": 126e6, "int8": 44e6}, 25e9, 32 * 2**20)
    lim = r["limits"]
    assert lim["roofline_tokens_per_s"]["int8"] == pytest.approx(568.18, abs=0.01)  # 25e9 / 44e6
    assert lim["ours_fp32_of_roofline"] == pytest.approx(76 / 198.41, abs=1e-4)
    assert lim["int8_vs_fp32_decode"] == pytest.approx(1.5)
    assert lim["meets"] == {"fp32_roofline": False, "int8_speedup": False}  # 38% < 75%, 1.5x < 1.8x
    rows = _limits.generate_rows({"meta": {"mode": "quick", "torch_threads": 2, "cpu_flags": ["avx2"]},
                                  "generate": [r]})
    assert [row[1] for row in rows] == ["76", "114"] and rows[0][4].startswith("38%")
    assert rows[0][6] == "NO" and rows[0][7] == "avx2" and rows[0][8] == "1.0 -> 1.5"
