"""The machine's limits, measured in the same run as a benchmark: the matmul peak of a dtype, the memory read
bandwidth, the last-level cache size and the CPU flags; and the arithmetic that turns them into a limit for a
figure (MFU, the weight-bandwidth roofline of batch-1 decoding, the per-token overhead above it).

A ratio to a peer says nothing about how much is left; a ratio to these limits does. Each benchmark calls
`machine_limits()` (or the single functions) while it runs, so the limit meets the same load as the figure.

    .venv/bin/python bench/_limits.py              # this machine's limits, as JSON
    .venv/bin/python bench/_limits.py --summary    # the summary table of bench/README.md from bench/results/*.json
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

# the flags that decide how fast a CPU multiplies fp32 / bf16 / int8 (named beside every figure)
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
                     "amx_int8")
CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")


def parse_cpu_flags(cpuinfo: str) -> list[str]:
    """The flags of interest present on the first `flags` line of /proc/cpuinfo text, in FLAGS_OF_INTEREST order."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            have = set(line.partition(":")[2].split())
            return [f for f in FLAGS_OF_INTEREST if f in have]
    return []


def cpu_flags() -> list[str]:
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return []


def parse_size(text: str) -> int:
    """A sysfs cache size ("32768K", "1M", "512") in bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a cache size: {text!r}")
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]


def last_level_cache_bytes(root: Path = CACHE_ROOT) -> int | None:
    """Size of the highest-level data/unified cache of cpu0 (sysfs), None where sysfs does not say."""
    best: tuple[int, int] | None = None
    for d in sorted(root.glob("index*")):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            entry = (int((d / "level").read_text()), parse_size((d / "size").read_text()))
        except (OSError, ValueError):
            continue
        best = entry if best is None or entry > best else best
    return None if best is None else best[1]


def read_bandwidth(nbytes: int | None = None, seconds: float = 1.0) -> float:
    """Memory read bandwidth in bytes/s: the fastest sum of an fp32 array of `nbytes` (default 16x the last-level
    cache, at least 1 GiB, so that it streams from memory: a VM may report less cache than the host has, and a
    256 MiB array was read at 88 GB/s here) over `seconds`, with torch's current threads. The best pass is kept, as
    for the matmul peak: load from other work only lowers a pass."""
    import torch

    llc = last_level_cache_bytes() or 32 * 2**20
    n = (nbytes or max(16 * llc, 2**30)) // 4
    x = torch.ones(n, dtype=torch.float32)
    x.sum()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        x.sum()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 >= t_end:
            break
    return 4 * n / best


def matmul_peak(dtype: str = "fp32", seconds: float = 1.0) -> float | None:
    """FLOP/s of `dtype` matmuls (cpmant.flops.measure_matmul_peak); None for bf16 on a CPU that does not multiply
    bf16 natively (it converts to fp32 at about 1 GFLOP/s: no peak worth naming, and a sample would take a minute)."""
    import torch

    from cpmant.flops import measure_matmul_peak
    from cpmant.precision import bf16_native

    if dtype == "bf16" and not bf16_native("cpu"):
        return None
    return measure_matmul_peak({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], seconds=seconds)


def machine_limits(seconds: float = 1.0) -> dict:
    """Every limit of this machine, measured now (a few seconds)."""
    return {"cpu_flags": cpu_flags(), "last_level_cache_bytes": last_level_cache_bytes(),
            "read_bandwidth_bytes_per_s": read_bandwidth(seconds=seconds),
            "peak_flops": {d: matmul_peak(d, seconds) for d in ("fp32", "bf16")}}


def weight_bytes(model) -> int:
    """Bytes of the tensors a decoding step reads: every parameter and buffer once (the token table is read whole
    by the tied output projection; shared storages count once)."""
    import itertools

    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def roofline_tokens_per_s(bytes_per_token: float, bandwidth: float) -> float:
    """Batch-1 decoding can go no faster than reading every weight once per token: bandwidth / bytes per token."""
    return bandwidth / bytes_per_token


def overhead_per_token_s(tokens_per_s: float, roofline: float) -> float:
    """Seconds per token spent above the roofline (dispatch, small ops, Python): 1/tokens_per_s - 1/roofline."""
    return 1.0 / tokens_per_s - 1.0 / roofline


# ================================================================================================================
# the summary table of bench/README.md: every figure beside its peer and its limit, from bench/results/*.json
# ================================================================================================================
SUMMARY_HEAD = ("measure", "ours", "peer", "limit", "ours/limit", "target", "met?", "CPU flags",
                "load (1-min at start -> end)")


def _load(entry: dict, meta: dict) -> str:
    la = entry.get("load_average") or {"before": meta.get("load_average_start"), "after": meta.get("load_average_end")}
    return f"{(la['before'] or ['?'])[0]} -> {(la['after'] or ['?'])[0]}"


def _row(measure, ours, peer, limit, share, target, met, meta, entry) -> tuple:
    yes = "-" if met is None else ("yes" if met else "NO")
    return (measure, ours, peer, limit, share, target, yes, " ".join(meta.get("cpu_flags", [])) or "?",
            _load(entry, meta))


def _fast(share: str, fastest: float | None, fmt: str = "{:.0%}") -> str:
    """A median-based figure with the fastest round's beside it (the figure a quiet moment gives)."""
    return share if fastest is None else f"{share} (fastest round {fmt.format(fastest)})"


def train_rows(r: dict) -> list[tuple]:
    m, out = r["meta"], []
    for s in r["train_step"]:
        tag = f"train step {s['config']} {s['batch_kind']}, {m['mode']}, {m['torch_threads']} threads"
        out.append(_row(f"{tag}, fp32: tokens/s (MFU)", f"{s['ours_tokens_per_s']:,.0f}",
                        f"{s['hf_tokens_per_s']:,.0f} transformers", f"{m['peak_flops'] / 1e9:,.0f} GFLOP/s fp32",
                        _fast(f"{s['ours_mfu']:.0%}", s.get("ours_mfu_fastest_round")),
                        "-" if s.get("mfu_target") is None else f">= {s['mfu_target']:.0%}",
                        s.get("meets_mfu_target"), m, s))
        if "ours_bf16_mfu" in s:
            out.append(_row(f"{tag}, bf16 autocast: tokens/s (MFU)", f"{s['ours_bf16_tokens_per_s']:,.0f}", "-",
                            f"{m['peak_flops_bf16'] / 1e9:,.0f} GFLOP/s bf16",
                            _fast(f"{s['ours_bf16_mfu']:.0%}", s.get("ours_bf16_mfu_fastest_round")),
                            "-" if s.get("mfu_target") is None else f">= {s['mfu_target']:.0%}",
                            None if s.get("mfu_target") is None else s["ours_bf16_mfu"] >= s["mfu_target"], m, s))
    return out


def tune_rows(r: dict) -> list[tuple]:
    m, s = r["meta"], r.get("step") or {}
    if "floor_tokens_per_s" not in s:
        return []
    tag = f"LoRA step tiny 8x128, {m['mode']}, {m['torch_threads']} threads"
    fast = s.get("fastest_round") or {}
    vs_floor = 1 / fast["ours_vs_floor"] if fast else None
    ceiling = s["floor_tokens_per_s"] / s["peft_tokens_per_s"]  # the most any step above the floor can be of PEFT
    return [_row(f"{tag}: tokens/s vs the frozen fwd+bwd floor", f"{s['ours_tokens_per_s']:,.0f}",
                 f"{s['peft_tokens_per_s']:,.0f} PEFT", f"{s['floor_tokens_per_s']:,.0f} floor",
                 _fast(f"{1 / s['ours_vs_floor']:.0%}", vs_floor),
                 f"time <= {s['floor_target']}x floor (>= {1 / s['floor_target']:.0%})", s["meets_floor_target"], m, s),
            _row(f"{tag}: tokens/s vs PEFT", f"{s['ours_tokens_per_s']:,.0f}",
                 _fast(f"{s['peft_tokens_per_s']:,.0f} PEFT: ours {s['ratio']:.2f}x", fast.get("ours_vs_peft"),
                       "{:.2f}x"), f"{s['floor_tokens_per_s']:,.0f} floor: at most {ceiling:.2f}x PEFT", "-",
                 f">= {s['target']}x PEFT",
                 s["meets_target"], m, s),
            _row(f"{tag}: MFU", f"{s['ours_mfu']:.1%}", f"{s['peft_mfu']:.1%} PEFT",
                 f"{s['peak_flops'] / 1e9:,.0f} GFLOP/s fp32", _fast(f"{s['ours_mfu']:.1%}", fast.get("ours_mfu")),
                 "-", None, m, s)]


def generate_rows(r: dict) -> list[tuple]:
    m, out = r["meta"], []
    for s in r["generate"]:
        lim = s.get("limits")
        if not lim:
            continue
        dec, roof, met = s["decode_tokens_per_s"], lim["roofline_tokens_per_s"], lim["meets"]
        fast = lim.get("fastest_round") or {}
        tag = f"decode batch 1, {s['config']}, {m['mode']}, {m['torch_threads']} threads"
        bw = f"{lim['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s / "
        if lim["weights_exceed_llc"]:
            out.append(_row(f"{tag}, fp32: tokens/s", f"{dec['ours_fp32']:,.0f}",
                            f"{dec['hf_fp32']:,.0f} transformers",
                            f"{roof['fp32']:,.0f} ({bw}{lim['weight_bytes']['fp32'] / 1e6:.0f} MB)",
                            _fast(f"{lim['ours_fp32_of_roofline']:.0%}", fast.get("ours_fp32_of_roofline")), ">= 75%",
                            met.get("fp32_roofline"), m, s))
            out.append(_row(f"{tag}, int8: tokens/s", f"{dec['ours_int8']:,.0f}", f"{dec['ours_fp32']:,.0f} ours fp32 "
                            f"({lim['int8_vs_fp32_decode']:.2f}x; >= 1.8x)",
                            f"{roof['int8']:,.0f} ({bw}{lim['weight_bytes']['int8'] / 1e6:.0f} MB)",
                            _fast(f"{lim['ours_int8_of_roofline']:.0%}", fast.get("ours_int8_of_roofline")),
                            ">= 75% and >= 1.8x fp32",
                            lim["ours_int8_of_roofline"] >= 0.75 and met.get("int8_speedup"), m, s))
        else:
            over = lim["overhead_s_per_token"]
            out.append(_row(f"{tag}, fp32: overhead ms/token above the roofline", f"{over['ours_fp32'] * 1e3:.2f}",
                            f"{over['hf_fp32'] * 1e3:.2f} transformers",
                            f"{1e3 / roof['fp32']:.2f} ms/token ({roof['fp32']:,.0f} tokens/s)",
                            _fast(f"{lim['overhead_ours_vs_hf']:.2f} of tf's", fast.get("overhead_ours_vs_hf"),
                                  "{:.2f}"), "<= 0.33 of transformers'",
                            met.get("overhead"), m, s))
    return out


def mfu_rows(r: dict) -> list[tuple]:
    m, s = r["meta"], r["mfu"]
    return [_row(f"tracked pretraining loop tiny, {m.get('precision', 'fp32')}, {m['mode']}: MFU",
                 f"{s['tokens_per_s']:,.0f} tokens/s", "-",
                 f"{s['peak_flops'] / 1e9:,.0f} GFLOP/s {m.get('precision', 'fp32')}", f"{s['mfu']:.1%}", "-", None,
                 m, {"load_average": {"before": m["load_average_start"], "after": m["load_average_end"]}})]


def summary_table(results: Path = Path(__file__).resolve().parent / "results") -> str:
    """The README's summary table from the benchmarks' JSON files in `results` (those present)."""
    from _common import markdown_table

    rows = []
    # tune_step.json: bench_tune.py --part speed --out bench/results/tune_step.json (keeps tune.json's scores)
    for names, fn in ((("train_step",), train_rows), (("tune_step", "tune"), tune_rows), (("mfu",), mfu_rows),
                      (("generate",), generate_rows)):
        path = next((results / f"{n}.json" for n in names if (results / f"{n}.json").exists()), None)
        if path is not None:
            rows += fn(json.loads(path.read_text(encoding="utf-8")))
    return markdown_table(SUMMARY_HEAD, rows)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(summary_table() if "--summary" in sys.argv else json.dumps(machine_limits(), indent=2))
