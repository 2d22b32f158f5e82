"""The 10B on this machine: a `10b`-preset checkpoint (random weights, int8 on disk, about 10 GB) generates through
`cpmant generate FOLDER TEXT --memory-budget 4GB --int8`, against the read-bandwidth limit of streaming the layers
that do not fit the budget.

Run from the repository root:  .venv/bin/python bench/bench_10b.py [--quick] [--home DIR] [--preset 10b]
    [--budget 4GB] [--layers N] [--new-tokens N]
Writes bench/results/10b.json (or --out) and prints a table; bench/README.md ("The 10B on this
machine") explains it.

The checkpoint is made once under --home (kept, so that reruns reuse it; the default temporary home is removed at the
end, checkpoint included): the preset's config with `quantization: int8`, written tensor by tensor (never the whole
model in memory, never a float copy of the Linears) in the layout `cpmant generate --int8` streams: encoder Linears as
int8 with a fp32 scale per row (uniform in [-127, 127] times sqrt(3)/127: CPM-Live's N(0, 1) init has the same
variance), embeddings and the position bias N(0, 1) and norms 1 in fp32 (the layout cpmant.offload.int8 writes
from a float checkpoint, e.g. CPM-Live's published fp16 10B after `cpmant convert`). `--quick`: the same widths with
6 layers and a 1.5GB budget (a smoke run: some layers resident, the rest streamed).

Measured, in this order:
1. the read bandwidth of the weights file: the disk's on a 1 GiB slice after its pages are dropped from the page
   cache (posix_fadvise DONTNEED on this file only), then one pass over the whole file in 1 MiB blocks with Python's
   readinto (from the page cache, which it leaves holding the file, as a rerun finds it; read() copies every byte),
   and the streamer's own path: each tensor's cached pages mapped in (MADV_POPULATE_READ, cpmant.offload.mapped),
   read once (a sum over it) and released.
2. `cpmant generate` through the console script, as a user runs it, greedy, `--stream`: stdout is read as it
   comes, with the time of each piece. Load time = start of the process to the prompt's echo (the CLI echoes it once
   the model is loaded); first-token latency = echo to the first piece (prefill + first token); tokens/s = pieces
   after the first over the time between the first and the last piece (one piece per token: greedy decoding of
   random weights gives no `</s>` and no empty pieces in practice; the piece count is recorded). Peak memory is
   the CLI's printed figure (resident set above its baseline, cpmant.memory.PeakMemory) and the process's maximum
   resident set from the kernel (wait4's ru_maxrss, baseline included).
The limits, seconds per token at least: the streamed layers' bytes (from the plan the CLI prints) over the page
cache's bandwidth through the map (the issue's limit: where the streamed layers come from in a warm run; also over
read()'s) and over the disk's (a cold cache); and, since decoding reads every weight once per token, the streamed
layers' bytes over the mapped bandwidth plus the other weights' bytes over the bandwidth of reading process memory
(a sum over 1 GiB): the roofline. tokens/s is compared with 1 / each.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fixture_texts, markdown_table, run_benchmark  # noqa: E402

MODES = {"full": dict(new_tokens=16, layers=0, quick=False),  # layers 0: the preset's
         "quick": dict(new_tokens=6, layers=6, quick=True)}
BUDGETS = {"full": "4GB", "quick": "1.5GB"}
PROMPT = "我们在假期去了法国的埃菲尔铁塔，"  # CPM-Live's text_generation.py example
MiB = 2**20
BLOCK = 1 << 20


# ---- the checkpoint: int8 on disk, written tensor by tensor --------------------------------------------------------


def _int8_items(config) -> list[tuple]:
    """(name, dtype, shape) of every tensor of the int8 model `config` describes (its state dict, on the meta
    device: nothing allocated)."""
    from cpmant.factory import build_model

    return [(n, t.dtype, tuple(t.shape)) for n, t in build_model(config, meta=True).state_dict().items()]


def _random_tensor(name: str, dtype, shape, seed: int):
    """The random value of one tensor (seeded per tensor, so the file does not depend on the writing order)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.empty(shape, dtype=torch.int8).random_(-127, 128, generator=g)
    if name.endswith("weight_scale"):
        return torch.full(shape, 3**0.5 / 127, dtype=dtype)
    if "layernorm" in name:
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=dtype)


def make_checkpoint(folder: Path, config) -> Path:
    """A complete cpmant checkpoint folder of the int8 model `config` with random weights (kept: made once)."""
    from cpmant.checkpoint import CONFIG_FILE, META_FILE, VOCAB_FILE, WEIGHTS_FILE
    from cpmant.fsutil import check_free_space, fsync_dir
    from cpmant.offload import write_safetensors_streaming
    from cpmant.tokenizer import build_vocab

    if (folder / META_FILE).is_file():
        return folder
    items = _int8_items(config)
    nbytes = sum(math.prod(s) * (1 if str(d) == "torch.int8" else 4) for _, d, s in items)
    check_free_space(folder.parent, nbytes + 64 * MiB)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seeds = {n: i for i, (n, _, _) in enumerate(sorted(items))}
    shapes = {n: (d, s) for n, d, s in items}
    print(f"   writing a {config.num_layers}-layer int8 checkpoint ({nbytes / 2**30:.2f} GiB) into {folder}",
          flush=True)
    t0 = time.perf_counter()
    write_safetensors_streaming(tmp / WEIGHTS_FILE, items, lambda n: _random_tensor(n, *shapes[n], seeds[n]))
    seconds = time.perf_counter() - t0
    config.save(tmp / CONFIG_FILE)
    build_vocab(fixture_texts(), config.vocab_size, tmp / VOCAB_FILE)
    _write_meta(tmp, items, seconds)
    fsync_dir(tmp)
    os.replace(tmp, folder)
    print(f"   written in {seconds:.0f} s ({nbytes / seconds / 2**30:.2f} GiB/s)", flush=True)
    return folder


def _write_meta(tmp: Path, items: list[tuple], seconds: float) -> None:
    """cpmant_meta.json, written last (it marks the folder complete): the fields cpmant.checkpoint writes; the small
    files hashed, the weights not (random, made here; hashing 10 GB takes longer than writing it): their size is."""
    from cpmant.checkpoint import META_FILE, WEIGHTS_FILE, git_sha, package_versions
    from cpmant.fsutil import write_json_atomic
    from cpmant.hashing import sha256_file

    files = sorted(p for p in tmp.iterdir() if p.is_file())
    write_json_atomic(tmp / META_FILE, {
        "format": "cpmant", "format_version": 1, "created_unix": time.time(), "git_sha": git_sha(),
        "packages": package_versions(),
        "num_parameters": sum(math.prod(s) for n, _, s in items if not n.endswith("weight_scale")),
        "files_sha256": {p.name: sha256_file(p) for p in files if p.name != WEIGHTS_FILE},
        "files_bytes": {p.name: p.stat().st_size for p in files},
        "made_by": {"benchmark": "bench/bench_10b.py", "random_weights": True, "write_seconds": round(seconds, 1)}})


# ---- the limit: read bandwidth of the weights file ---------------------------------------------------------------
def read_bandwidth(path: Path, limit: int | None = None) -> float:
    """Bytes/s of one pass over the file's first `limit` bytes (all by default) in 1 MiB blocks (readinto)."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    done, end = 0, limit or path.stat().st_size
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while done < end:
            n = f.readinto(view)
            if not n:
                break
            done += n
    return done / (time.perf_counter() - t0)


def mapped_read_bandwidth(path: Path) -> float:
    """Bytes/s of the streamer's path over every tensor of the file: fault its cached pages into the memory map
    (MADV_POPULATE_READ), read each byte once (a sum over it, as 8-byte words where aligned: the matmuls read a
    streamed weight once per token), release the pages (MADV_DONTNEED). No copy, unlike read()."""
    import torch

    from cpmant.offload.mapped import _MappedFile

    mf = _MappedFile(path)
    try:
        total = 0
        t0 = time.perf_counter()
        for n, e in mf.index.items():
            mf.populate([n])
            raw = mf._bytes[e.begin:e.end]
            (raw.view(torch.int64) if e.begin % 8 == 0 and e.nbytes % 8 == 0 else raw).sum()
            mf.release([n])
            total += e.nbytes
        return total / (time.perf_counter() - t0)
    finally:
        mf.close()


def ram_bandwidth(nbytes: int = 2**30) -> float:
    """Bytes/s of reading process memory (a sum over a 1 GiB tensor as 8-byte words, best of 3): what the resident
    layers' matmuls read from, with no page to map."""
    import torch

    t = torch.ones(nbytes // 8, dtype=torch.int64)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def disk_bandwidth(path: Path, nbytes: int = 2**30) -> float:
    """Bytes/s of reading the file's first `nbytes` after dropping those pages from the page cache (this file's
    pages only: posix_fadvise DONTNEED); they are read back into the cache by the measurement itself."""
    n = min(nbytes, path.stat().st_size)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped
        os.posix_fadvise(f.fileno(), 0, n, os.POSIX_FADV_DONTNEED)
    return read_bandwidth(path, n)


def cached_fraction(path: Path) -> float:
    """The share of the file's pages in the page cache now (mincore(2) on a fresh mapping; maps nothing in)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return float("nan")
    try:
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            return float("nan")
        return sum(b & 1 for b in bytes(vec)) / pages
    finally:
        libc.munmap(addr, size)


# ---- the run: `cpmant generate` as a user runs it --------------------------------------------------------------------
def run_cli(folder: Path, budget: str, new_tokens: int, home: Path) -> dict:
    """One `cpmant generate ... --memory-budget B --int8 --stream` with the time of every stdout piece."""
    cli = Path(sys.executable).parent / "cpmant"
    cmd = [str(cli), "generate", str(folder), PROMPT, "--memory-budget", budget, "--int8", "--stream",
           "--max-new-tokens", str(new_tokens), "--temperature", "0", "--repetition-penalty", "1.0"]
    env = {**os.environ, "CPMANT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    chunks: list[tuple[float, bytes]] = []
    while True:
        b = os.read(proc.stdout.fileno(), 65536)
        if not b:
            break
        chunks.append((time.perf_counter() - t0, b))
    err = proc.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cpmant generate failed ({proc.returncode}): {err[-3000:]}")
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "chunks": chunks, "stderr": err,
            "max_rss_mb": usage.ru_maxrss / 1024}


def _timings(chunks: list[tuple[float, bytes]]) -> dict:
    """Load time, first-token latency and tokens/s from the timed stdout pieces (the first holds the prompt's echo)."""
    echo = PROMPT.encode()
    t_loaded, first = None, []
    for t, b in chunks:
        if t_loaded is None and echo in b:
            t_loaded = t
            rest = b.split(echo, 1)[1].strip(b"\n")
            if rest:  # the first piece came in the same read as the echo
                first.append((t, rest))
            continue
        if b.strip(b"\n"):
            first.append((t, b))
    if t_loaded is None or not first:
        raise RuntimeError(f"no prompt echo or no piece in the output: {chunks!r}")
    pieces = len(first)
    span = first[-1][0] - first[0][0]
    return {"load_s": t_loaded, "first_token_s": first[0][0] - t_loaded, "pieces": pieces,
            "tokens_per_s": (pieces - 1) / span if pieces > 1 and span > 0 else None,
            "text": b"".join(b for _, b in first).decode("utf-8", "replace")}


def _parse_stderr(err: str) -> dict:
    peak = re.search(r"peak (?:resident )?memory ([0-9.]+) MiB", err)
    plan = re.search(r"(\d+) of (\d+) layers resident, (\d+) streamed", err)
    if not peak or not plan:
        raise RuntimeError(f"cannot read the peak memory or the plan from the CLI's output: {err[-2000:]}")
    return {"peak_mb": float(peak.group(1)), "resident_layers": int(plan.group(1)), "layers": int(plan.group(2)),
            "streamed_layers": int(plan.group(3))}




# ---- the benchmark ------------------------------------------------------------------------------------------------
def measure(args, mode, home, report):
    from cpmant.config import get_preset
    from cpmant.offload import read_safetensors_index
    from cpmant.offload.plan import _layer_of

    base = get_preset(args.preset)
    layers = mode["layers"] or base.num_layers
    config = base.replace(num_layers=layers, half=False, quantization="int8",
                          mask_modules=None if base.mask_modules is None else base.mask_modules[:layers])
    budget = args.budget or BUDGETS["quick" if mode["quick"] else "full"]
    name = f"{args.preset}-l{layers}-int8"
    folder = make_checkpoint(Path(home) / "bench-10b" / name, config)
    weights = folder / "model.safetensors"
    index = read_safetensors_index(weights)
    layer_bytes = [0] * layers
    for n, e in index.items():
        if (i := _layer_of(n)) is not None:
            layer_bytes[i] += e.nbytes
    meta = report["meta"]
    meta.update(preset=args.preset, layers=layers, budget=budget, checkpoint=str(folder), prompt=PROMPT,
                weights_bytes=weights.stat().st_size,
                mem_total_mb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MiB))
    print(f"   checkpoint {folder} ({weights.stat().st_size / 2**30:.2f} GiB); CPU flags {meta['cpu_flags']}",
          flush=True)

    bw = {"disk_read_1gib": disk_bandwidth(weights)}
    bw["page_cache_read"] = read_bandwidth(weights)  # also leaves the file in the page cache, as a rerun finds it
    bw["page_cache_mapped"] = mapped_read_bandwidth(weights)  # the streamer's own path: map in, read once
    bw["ram"] = ram_bandwidth()
    print("   bandwidth GB/s: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in bw.items()), flush=True)

    cached = cached_fraction(weights)
    la = os.getloadavg()
    run = run_cli(folder, budget, mode["new_tokens"], Path(home))
    cached_after = cached_fraction(weights)
    la_after = os.getloadavg()
    t = _timings(run["chunks"])
    plan = _parse_stderr(run["stderr"])
    streamed_bytes = sum(layer_bytes[plan["resident_layers"]:])  # the plan streams the last layers
    # seconds per token at least: the streamed layers' bytes from the page cache (the issue's limit) or from the disk
    # (a cold cache), and every weight byte read once per token at the page cache's (RAM's) bandwidth: the roofline
    limits = {"streamed_from_page_cache": streamed_bytes / bw["page_cache_mapped"],
              "streamed_from_page_cache_read": streamed_bytes / bw["page_cache_read"],
              "streamed_from_disk": streamed_bytes / bw["disk_read_1gib"],
              # the streamed layers through the map, the rest (resident layers, embeddings) from process memory
              "streamed_mapped_plus_resident_from_ram": streamed_bytes / bw["page_cache_mapped"]
              + (sum(e.nbytes for e in index.values()) - streamed_bytes) / bw["ram"]}
    tps = t["tokens_per_s"]
    report["results"] = {
        "command": "cpmant " + run["command"],
        **plan, **t, "wall_s": run["wall_s"], "max_rss_mb": run["max_rss_mb"], "new_tokens": mode["new_tokens"],
        "streamed_bytes_per_token": streamed_bytes, "bandwidth_bytes_per_s": bw,
        "limit_s_per_token": limits,
        "ours_vs_limit": {k: v * tps if tps else None for k, v in limits.items()},  # limit s/token over ours
        "load_1min": {"before": round(la[0], 2), "after": round(la_after[0], 2)},
        "page_cache_share": {"before": round(cached, 3), "after": round(cached_after, 3)},
        "stderr_tail": run["stderr"][-1500:]}
    print(f"   load {t['load_s']:.1f} s, first token {t['first_token_s']:.1f} s, "
          f"{tps and round(tps, 3)} tokens/s over {t['pieces']} pieces, peak {plan['peak_mb']:.0f} MiB "
          f"(max RSS {run['max_rss_mb']:.0f} MiB), streamed {streamed_bytes / 1e9:.2f} GB/token", flush=True)


def table(report) -> str:
    r, m = report["results"], report["meta"]
    lim = r["limit_s_per_token"]
    rows = [["model", f"{m['preset']} widths, {m['layers']} layers, int8 on disk "
                      f"({m['weights_bytes'] / 1e9:.2f} GB)"],
            ["budget / layers", f"{m['budget']}: {r['resident_layers']} resident, {r['streamed_layers']} streamed "
                                f"({r['streamed_bytes_per_token'] / 1e9:.2f} GB streamed per token)"],
            ["load (process start to prompt echo)", f"{r['load_s']:.1f} s"],
            ["first-token latency (prefill + 1 token)", f"{r['first_token_s']:.1f} s"],
            ["tokens/s (after the first)", "-" if r["tokens_per_s"] is None else
             f"{r['tokens_per_s']:.3f} ({1 / r['tokens_per_s']:.2f} s/token, {r['pieces']} pieces)"],
            ["peak memory (CLI, above baseline) / max RSS", f"{r['peak_mb']:.0f} MiB / {r['max_rss_mb']:.0f} MiB"]]
    bw = r["bandwidth_bytes_per_s"]
    label = {"streamed_from_page_cache":
             f"streamed layers from the page cache, mapped ({bw['page_cache_mapped'] / 1e9:.1f} GB/s)",
             "streamed_from_page_cache_read":
             f"streamed layers from the page cache, read() ({bw['page_cache_read'] / 1e9:.1f} GB/s)",
             "streamed_from_disk": f"streamed layers from the disk ({bw['disk_read_1gib'] / 1e9:.2f} GB/s, cold)",
             "streamed_mapped_plus_resident_from_ram": f"streamed layers mapped + the rest from RAM "
                                                       f"({bw['ram'] / 1e9:.1f} GB/s)"}
    for k, v in lim.items():
        share = r["ours_vs_limit"][k]
        rows.append([f"limit: {label[k]}", f">= {v:.3f} s/token" + (f"; ours at {share * 100:.0f}% of it" if share
                                                                     else "")])
    pc = r["page_cache_share"]
    rows.append(["weights file in the page cache before -> after", f"{pc['before']:.0%} -> {pc['after']:.0%}"])
    rows.append(["CPU flags, load (1 min) before -> after",
                 f"{' '.join(m['cpu_flags'])}; {r['load_1min']['before']} -> {r['load_1min']['after']}"])
    return markdown_table(["measure", "value"], rows) + f"\n\ncommand: `{r['command']}`"


def _arguments(ap):
    from cpmant.config import PRESETS

    ap.add_argument("--preset", default="10b", choices=sorted(PRESETS), help="model widths (default 10b)")
    ap.add_argument("--budget", default=None, help="--memory-budget (default 4GB; 1.5GB with --quick)")


if __name__ == "__main__":
    sys.exit(run_benchmark("10b", __doc__, MODES, measure, table, arguments=_arguments,
                           quick_help="6 layers of the preset and a 1.5GB budget"))
