"""Corpus encoding: ours on 1 and N processes vs transformers' CpmAntTokenizer on one core, with identical ids.

Run from the repository root:  .venv/bin/python bench/bench_encoding.py [--quick]
Writes bench/results/encoding.json and prints a table; bench/README.md ("Corpus encoding") explains it.

All documents of the default corpus (train + valid), with the tiny preset's 8000-token vocab. The three peers
alternate round by round; ratios are medians of per-round ratios. The benchmark process stays lean (no models,
no MLflow), as when a pipeline prepares its data: forking workers from a grown process costs more.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (the environment must be isolated before cpmant modules are used)
    interleave, markdown_table, median, paired_ratio, prepare_default_corpus, recording_load, run_benchmark, verdict,
)

TARGET_SCALING = 0.9  # N encode workers give >= 0.9 x N x one worker
# timed rounds, after untimed warm-up rounds (the first encode of a process is slower: lazy caches)
MODES = {"full": dict(rounds=4, warmup=1), "quick": dict(rounds=1, warmup=1)}


def measure(args, mode: dict, home: Path, report: dict) -> None:
    from transformers import CpmAntTokenizer

    from cpmant.corpus import load_corpus
    from cpmant.encode import encode_documents
    from cpmant.tokenizer import CPMAntTokenizer

    vocab_path = prepare_default_corpus().vocab_path
    c = load_corpus(None)
    docs = [*c.train, *c.valid]
    n_cores = os.cpu_count() or 1
    chars = sum(len(d) for d in docs)
    hf_tok = CpmAntTokenizer(str(vocab_path))
    # jieba loads its dictionary on first use (about a second): load it for both before any timing. Forked
    # workers inherit ours already loaded; the pool start itself is part of the N-process time, as in real use.
    CPMAntTokenizer(vocab_path).encode(docs[0])
    hf_tok.encode(docs[0], add_special_tokens=False)
    out: dict[str, list] = {}
    child_cpu: list[float] = []  # CPU seconds of the N workers, per N-process run
    serial_cpu: list[float] = []  # CPU seconds of this process, per 1-process run
    parent_cpu: list[float] = []  # CPU seconds of this process while N workers encode (it only hands out chunks)

    def ours(workers):
        def fn():
            cache = Path(tempfile.mkdtemp(prefix="enc-", dir=home))  # empty cache: nothing is loaded from disk
            c0, p0 = os.times(), time.process_time()
            try:
                out[f"ours{workers}"] = encode_documents(docs, vocab_path, cache_dir=cache, num_workers=workers,
                                                         drop_unk=False, progress=False)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            if workers > 1:  # pool workers have been joined, so their CPU time is in children_*
                c1 = os.times()
                child_cpu.append((c1.children_user - c0.children_user) + (c1.children_system - c0.children_system))
                parent_cpu.append(time.process_time() - p0)
            else:
                serial_cpu.append(time.process_time() - p0)
        return fn

    def hf():
        out["hf"] = [hf_tok.encode(d, add_special_tokens=False) for d in docs]

    print(f"   {len(docs)} documents, {chars:,} characters, {mode['warmup']} + {mode['rounds']} round(s)",
          flush=True)
    with recording_load(e := {}):
        secs = interleave({"ours_1": ours(1), "hf_1": hf, "ours_n": ours(n_cores)}, mode["rounds"], mode["warmup"])
    del child_cpu[:-mode["rounds"]], serial_cpu[:-mode["rounds"]], parent_cpu[:-mode["rounds"]]  # timed rounds
    ref = out["hf"]
    same = [a.tolist() == b for a, b in zip(out["ours1"], ref)]
    same_n = all(a.tolist() == b.tolist() for a, b in zip(out["ours1"], out[f"ours{n_cores}"]))
    scaling = paired_ratio(secs["ours_1"], [s * n_cores for s in secs["ours_n"]])  # (N-core rate) / (N x 1-core)
    report["encode"] = {
        **e,
        "documents": len(docs), "chars": chars, "tokens": sum(len(x) for x in ref), "cores": n_cores,
        "chars_per_s": {k: chars / median(v) for k, v in secs.items()},
        "ours_1_vs_hf_1": paired_ratio(secs["hf_1"], secs["ours_1"]),
        "parallel_scaling": scaling,
        "scaling_target": TARGET_SCALING,
        "meets_scaling_target": scaling >= TARGET_SCALING,
        # CPU the N workers burned vs the CPU of the 1-process run: near 1 means the work split cleanly and a
        # shortfall in scaling is cores taken by other load (or the pool's start); above 1, the parallel path adds
        # work of its own. Its inverse is about the best scaling this code could reach on idle cores.
        "worker_cpu_vs_serial": median(child_cpu) / median(serial_cpu) if child_cpu else None,
        "parent_cpu_vs_serial": median(parent_cpu) / median(serial_cpu) if parent_cpu else None,
        "parent_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "ids_identical": all(same) and len(same) == len(ref),
        "documents_differing": len(same) - sum(same),
        "parallel_equals_serial": same_n,
        "rounds_seconds": secs,
    }


def table(r: dict) -> str:
    e = r["encode"]
    rows = [
        ("encode chars/s: ours 1 / HF 1 / ours N",
         " / ".join(f"{e['chars_per_s'][k]:,.0f}" for k in ("ours_1", "hf_1", "ours_n")), "", ""),
        ("encode: ours-1-core / HF-1-core", f"{e['ours_1_vs_hf_1']:.2f}x", "", ""),
        (f"encode: parallel scaling ({e['cores']} cores)", f"{e['parallel_scaling']:.2f}", f">= {TARGET_SCALING}",
         verdict(e["meets_scaling_target"])),
        ("encode: ids identical to transformers", str(e["ids_identical"]).lower(), "true",
         verdict(e["ids_identical"])),
        ("encode: N processes = 1 process", str(e["parallel_equals_serial"]).lower(), "true",
         verdict(e["parallel_equals_serial"])),
    ]
    return markdown_table(("measurement", "value", "target", "met"), rows)


if __name__ == "__main__":
    sys.exit(run_benchmark("encoding", __doc__, MODES, measure, table, quick_help="one warm-up and one timed round (a smoke run)"))
