"""Memory-budget inference (cpmant.offload, BMInf's idea on the CPU): tokens/s and peak memory at budgets of 1, 1/2
and 1/4 of the weights, the smallest budget that works, and 1/8 with --int8, against the fully loaded model and
against the limit of streaming: the read bandwidth of where the streamed layers come from (the page cache).

Run from the repository root:  .venv/bin/python bench/bench_memory_budget.py [--quick] [--threads N]
Writes bench/results/memory_budget.json and prints a table; bench/README.md ("Memory budget") explains it.

The model: d512, 24 layers, dim_ff 1536, 8 heads (random weights, 315 MiB fp32): layers are 98% of the weights, so
the budget decides how many stay resident. Each measurement runs in a fresh process and measures peak memory the
way `cpmant generate --memory-budget` prints it (one function: cpmant.offload.peak.budget_peak: the allocator
bounded, torch warmed up at the model's shapes, then the resident set above that baseline); it loads the model
(`load_pretrained`, or `load_with_budget` with the budget), generates 2 tokens, then times greedy decoding of
new_tokens after a 5-character prompt (batch 1), twice, keeping the faster. The peak covers loading and all
decoding. Configurations take turns round after round; speed ratios are medians of per-round ratios against the
fully loaded model.

The limit: a streamed layer's weights are read from the page cache at every token (the file was written by this run
and stays cached), so seconds per token >= bytes streamed per token / the page cache's read bandwidth, measured in
the same run by reading the weights file once in 1 MiB blocks (`page_cache_bandwidth`). The CPU flags and the load
average are recorded beside each figure (bench/_limits.py's cpu_flags, in the report's meta).
Target (issue 9): at 1/4 of the weights, >= 50% of the unconstrained tokens/s with the peak within the budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fixture_texts, markdown_table, median, paired_ratio, run_benchmark  # noqa: E402

MODES = {"full": dict(rounds=3, new_tokens=32, quick=False),
         "quick": dict(rounds=1, new_tokens=16, quick=True)}
MODEL = dict(dim_model=512, dim_ff=1536, num_layers=24, num_heads=8, dim_head=64, position_bias_num_buckets=32,
             position_bias_max_distance=512)
# name -> (fraction of the fp32 weights, or "least": the smallest budget the plan takes (every layer streamed), int8)
FRACTIONS = {"full (no budget)": (None, False), "1x": (1.0, False), "1/2": (0.5, False), "1/4": (0.25, False),
             "smallest (fp32)": ("least", False), "1/8 int8": (0.125, True)}
PROMPT = "床前明月光"




def make_checkpoint(folder: Path) -> Path:
    import torch

    from cpmant.checkpoint import save_model_dir
    from cpmant.config import ModelConfig
    from cpmant.factory import build_model
    from cpmant.tokenizer import build_vocab

    folder.parent.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(fixture_texts(), 600, folder.parent / "vocab.txt")
    cfg = ModelConfig(vocab_size=len(vocab.read_text(encoding="utf-8").splitlines()), **MODEL)
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():
        m.input_embedding.weight.mul_(0.2)
    save_model_dir(folder, m.state_dict(), cfg, vocab)
    del m
    return folder


def page_cache_bandwidth(path: Path, block: int = 2**20) -> float:
    """Bytes/s of reading `path` once in `block`-byte reads (after one read that puts it in the page cache): where
    the streamed layers come from."""
    buf = bytearray(block)
    view = memoryview(buf)
    for timed in (False, True):
        with open(path, "rb", buffering=0) as f:
            t0, n = time.perf_counter(), 0
            while True:
                got = f.readinto(view)
                if not got:
                    break
                n += got
            seconds = time.perf_counter() - t0
    return n / seconds


def _least(folder: Path, tokens: int) -> int:
    """The smallest budget the fp32 plan takes for these lengths: the one the error of a 1-byte budget names."""
    import re

    from cpmant.errors import CpmantError
    from cpmant.offload import load_with_budget, parse_size

    try:
        load_with_budget(folder, 1, tokens=tokens)
    except CpmantError as e:
        return parse_size(re.search(r"--memory-budget (\S+) or more", e.fix).group(1))
    raise AssertionError("a 1-byte budget was taken")


def child(folder: str, name: str, new_tokens: int, threads: int) -> dict:
    """One measurement in this (fresh) process: load, generate, time; returns a dict (printed as JSON)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    from cpmant.checkpoint import load_pretrained
    from cpmant.generate import generate_ids
    from cpmant.offload import load_with_budget
    from cpmant.offload.peak import budget_peak
    from cpmant.tokenizer import jieba_cut

    folder = Path(folder)
    fraction, int8 = FRACTIONS[name]
    weights = (folder / "model.safetensors").stat().st_size
    jieba_cut(PROMPT)  # jieba's dictionary is the baseline's, as in `cpmant generate`
    kw = dict(max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
    tokens = len(PROMPT) + 1 + new_tokens
    budget = None if fraction is None else _least(folder, tokens) if fraction == "least" else int(weights * fraction)
    with budget_peak(folder, int8) as pm:
        if budget is None:
            model, tok = load_pretrained(folder)
        else:
            model, tok = load_with_budget(folder, budget, int8=int8, tokens=tokens)
        generate_ids(model, tok, [PROMPT], max_new_tokens=2)
        times, counts = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            out = generate_ids(model, tok, [PROMPT], **kw)
            times.append(time.perf_counter() - t0)
            counts.append(len(out[0]))
    best = min(range(2), key=lambda i: times[i] / max(counts[i], 1))
    plan = getattr(model, "offload", None)
    s = getattr(model, "offload_streamer", None)
    streamed = 0 if plan is None else sum(plan.layer_bytes[i] for i in plan.streamed)
    return {"weights_mb": weights / 2**20, "budget_mb": None if budget is None else budget / 2**20, "int8": int8,
            "tokens_per_s": counts[best] / times[best], "tokens": counts[best], "peak_mb": pm.peak_mb,
            "samples": pm.samples, "resident_layers": None if plan is None else len(plan.resident),
            "streamed_layers": None if plan is None else len(plan.streamed), "streamed_bytes_per_token": streamed,
            "planned_mb": None if plan is None else (plan.planned_bytes + plan.headroom_bytes) / 2**20,
            "loads": None if s is None else s.loads, "waits": None if s is None else s.waits}


def measure(args, mode, home, report):
    folder = make_checkpoint(Path(home) / "offload-bench" / "model")
    report["meta"]["model"] = MODEL
    report["meta"]["threads"] = args.threads
    bandwidths = []
    runs: dict[str, list[dict]] = {k: [] for k in FRACTIONS}
    order = list(FRACTIONS)
    for r in range(mode["rounds"]):
        bandwidths.append(page_cache_bandwidth(folder / "model.safetensors"))
        print(f"  round {r + 1}: page cache read {bandwidths[-1] / 1e9:.2f} GB/s (1 MiB blocks)", flush=True)
        for name in (order if r % 2 == 0 else order[::-1]):
            cmd = [sys.executable, __file__, "--child", str(folder), name, str(mode["new_tokens"]), str(args.threads)]
            la = os.getloadavg()[0]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if res.returncode != 0:
                raise RuntimeError(f"{name}: {res.stderr[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["load_1min"] = round(la, 2)
            runs[name].append(row)
            print(f"  round {r + 1} {name}: {row['tokens_per_s']:.2f} tok/s, peak {row['peak_mb']:.1f} MiB "
                  f"(budget {row['budget_mb'] and round(row['budget_mb'], 1)}), load {la:.2f}", flush=True)
    bandwidth = median(bandwidths)
    report["meta"]["page_cache_read_bytes_per_s"] = bandwidth
    base = [x["tokens_per_s"] for x in runs["full (no budget)"]]
    results = {}
    for name, rows in runs.items():
        tps = [x["tokens_per_s"] for x in rows]
        per_token = rows[0]["streamed_bytes_per_token"]
        limit = None if not per_token else bandwidth / per_token  # tokens/s if streaming were all it did
        results[name] = {
            "fraction": FRACTIONS[name][0], "int8": FRACTIONS[name][1], "weights_mb": rows[0]["weights_mb"],
            "budget_mb": rows[0]["budget_mb"], "streamed_mb_per_token": per_token / 2**20,
            "limit_tokens_per_s": limit, "of_limit": None if limit is None else median(tps) / limit,
            "resident_layers": rows[0]["resident_layers"], "streamed_layers": rows[0]["streamed_layers"],
            "tokens_per_s": median(tps), "speed_vs_full": paired_ratio(tps, base),
            "peak_mb_max": max(x["peak_mb"] for x in rows),
            "within_budget": None if rows[0]["budget_mb"] is None else all(x["peak_mb"] <= x["budget_mb"]
                                                                           for x in rows),
            "runs": rows}
    q = results["1/4"]
    report["results"] = results
    report["target"] = {"budget": "1/4 of the weights", "speed_vs_full": q["speed_vs_full"],
                        "within_budget": q["within_budget"],
                        "met": bool(q["speed_vs_full"] >= 0.5 and q["within_budget"])}


def table(report) -> str:
    rows = []
    for name, r in report["results"].items():
        lim = r["limit_tokens_per_s"]
        rows.append([name, "-" if r["budget_mb"] is None else f"{r['budget_mb']:.1f}",
                     "all" if r["resident_layers"] is None else f"{r['resident_layers']} / {r['streamed_layers']}",
                     f"{r['peak_mb_max']:.1f}", "-" if r["within_budget"] is None else
                     ("yes" if r["within_budget"] else "NO"),
                     f"{r['tokens_per_s']:.2f}", f"{r['speed_vs_full'] * 100:.0f}%",
                     f"{r['streamed_mb_per_token']:.0f}", "-" if lim is None else f"{lim:.1f}",
                     "-" if lim is None else f"{r['of_limit']:.0%}"])
    t, m = report["target"], report["meta"]
    return (markdown_table(["weights budget", "budget MiB", "resident / streamed layers", "peak MiB",
                            "peak <= budget", "tokens/s", "speed vs full", "streamed MiB/token",
                            "limit tokens/s", "of limit"], rows)
            + f"\n\nlimit = page cache read {m['page_cache_read_bytes_per_s'] / 1e9:.2f} GB/s (1 MiB blocks, this "
              f"run) / bytes streamed per token; CPU flags: {' '.join(m.get('cpu_flags', [])) or '?'}; load "
              f"{m.get('load_average_start')} -> {m.get('load_average_end')}"
            + f"\n\ntarget at 1/4 of the weights: speed {t['speed_vs_full'] * 100:.0f}% (>= 50%), peak within "
              f"budget: {t['within_budget']} -> {'met' if t['met'] else 'NOT met'}")


def _arguments(ap):
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default 1; the prefetch "
                                                             "thread is extra)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, folder, name, n, threads = sys.argv
        print(json.dumps(child(folder, name, int(n), int(threads))))
        sys.exit(0)
    sys.exit(run_benchmark("memory_budget", __doc__, MODES, measure, table, arguments=_arguments))
