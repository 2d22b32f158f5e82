"""Real checkpoints of ~5 / ~50 / ~300 MB and their copy-vs-registry bookkeeping (bench_register.py and
bench_pull.py).

Checkpoints are real CPMAnt models saved by save_model_dir, on the tiny preset with a synthetic 8000-token vocab.
Every file is in the page cache, as it is right after training writes a checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from _common import Phases, load_average, median, paired_ratio, spread

# Model shapes (on the tiny preset: vocab 8000, prompt 4x8, segments 4) and their safetensors size (fp32)
SIZES = {
    "5MB": dict(dim_model=96, dim_ff=256, num_layers=4, num_heads=4, dim_head=24),  # 1.2 M params, 4.9 MB
    "50MB": dict(dim_model=384, dim_ff=1024, num_layers=6, num_heads=6, dim_head=64),  # 13.7 M params, 55 MB
    "300MB": dict(dim_model=1024, dim_ff=2560, num_layers=6, num_heads=16, dim_head=64),  # 80.6 M params, 322 MB
}
MODES = {
    "full": dict(sizes=["5MB", "50MB", "300MB"], rounds=11),
    "quick": dict(sizes=["5MB", "50MB"], rounds=7),
}
VOCAB_SIZE = 8000  # 10 specials + 7931 CJK characters (U+4E00.., covers 床前明月光) + <s0>..<s58>


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), help="override the mode's sizes")
    ap.add_argument("--torch-threads", type=int, help="torch.set_num_threads for the run (default: torch's own, "
                    "one per core); the smoke generation inside register_checkpoint is sensitive to it under load")


def write_vocab(path: Path) -> Path:
    """A synthetic vocab.txt the tokenizer accepts: the 10 specials at ids 0..9, CJK characters, <s0>..<s58>."""
    from cpmant.tokenizer import SENTINELS, SPECIAL_TOKENS

    n_chars = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(SENTINELS)
    tokens = [*SPECIAL_TOKENS, *(chr(0x4E00 + i) for i in range(n_chars)), *SENTINELS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def build_checkpoint(out_dir: Path, label: str, vocab: Path) -> dict:
    """A complete checkpoint folder (model.safetensors, config.json, vocab.txt, cpmant_meta.json) of a real model."""
    import torch

    from cpmant.checkpoint import WEIGHTS_FILE, is_complete, save_model_dir
    from cpmant.config import get_preset
    from cpmant.model import CPMAnt
    from cpmant.tokenizer import CPMAntTokenizer

    config = get_preset("tiny").replace(vocab_size=VOCAB_SIZE, **SIZES[label])
    torch.manual_seed(0)
    model = CPMAnt(config)
    n_params = model.num_parameters()
    if not is_complete(out_dir):  # (a --home from an earlier run already has it)
        save_model_dir(out_dir, model.state_dict(), config, vocab,
                       meta={"config_sha256": "c" * 64, "data_sha256": "d" * 64, "bench": "registry"})
    del model
    CPMAntTokenizer(out_dir / "vocab.txt")  # the vocab passes the tokenizer's checks
    return {"label": label, "path": str(out_dir), "params": n_params,
            "safetensors_mb": round((out_dir / WEIGHTS_FILE).stat().st_size / 1e6, 2),
            "folder_mb": round(folder_bytes(out_dir) / 1e6, 2), "config": SIZES[label]}


def build_checkpoints(args, mode: dict, home: Path, report: dict) -> list[dict]:
    """Apply --sizes / --torch-threads, build the mode's checkpoints under home, record the settings in meta."""
    import torch

    if args.sizes:
        mode["sizes"] = args.sizes
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    report["meta"].update(sizes=mode["sizes"], torch_threads=torch.get_num_threads())
    vocab = write_vocab(home / "vocab.txt")
    cks = []
    for label in mode["sizes"]:
        t0 = time.perf_counter()
        cks.append(build_checkpoint(home / "checkpoints" / label, label, vocab))
        print(f"   built {label}: {cks[-1]['params'] / 1e6:.1f} M params, {cks[-1]['safetensors_mb']} MB safetensors "
              f"({time.perf_counter() - t0:.1f} s); load average {load_average()}", flush=True)
    return cks


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def sha256_folder(path: Path) -> None:
    """Every file of the folder hashed once: the least any byte-for-byte verification can cost."""
    from cpmant.hashing import sha256_file

    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            sha256_file(p)


def stored_model_dir(name: str, version: int) -> Path:
    """The artifact store's folder of a registered version (MLmodel, ..., artifacts/<checkpoint>/)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.utils.file_utils import local_file_uri_to_path

    mv = MlflowClient().get_model_version(name, str(version))
    model_id = mv.model_id or mv.source.removeprefix("models:/")
    return Path(local_file_uri_to_path(mlflow.get_logged_model(model_id).artifact_location))


class Fresh:
    """Fresh destination folders under one scratch folder (same filesystem as the store)."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0
        root.mkdir(parents=True, exist_ok=True)

    def __call__(self) -> Path:
        self.n += 1
        return self.root / f"d{self.n:04d}"


def rm(path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def summarize(times: dict[str, list[float]], peer: str, ours: list[str]) -> dict:
    """Median seconds of every peer, spread, and each of `ours` as a paired ratio to `peer`."""
    out = {"seconds": {k: round(median(v), 4) for k, v in times.items()},
           "spread": {k: round(spread(v), 3) for k, v in times.items()},
           "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()}}
    out["ratio"] = {k: round(paired_ratio(times[k], times[peer]), 2) for k in ours}
    # copy + one sha256 pass over the same bytes: the least a design that copies and hashes every byte can cost
    out["floor_ratio_copy_plus_sha256"] = round(paired_ratio([c + h for c, h in zip(times[peer], times["sha256"])],
                                                             times[peer]), 2)
    return out


def breakdown_table(title: str, x: dict, extra: str = "") -> str:
    from _common import markdown_table

    head = (f"{title}: median {x['median_total_s']:.3f} s over {x['rounds']} measured rounds; phases are per-phase "
            f"medians (sum {x['sum_of_medians_s']:.3f} s){extra}")
    rows = [("  " * (row["depth"] - 1) + row["phase"], f"{row['seconds']:.3f}", f"{row['share']:.0%}")
            for row in x["phases"]]
    return head + "\n\n" + markdown_table(("phase", "s", "share"), rows)


def measure_each(cks: list[dict], home: Path, rounds: int, report: dict, what: str, install_phases, bench) -> list:
    """`bench(ck, rounds, fresh, phases)` on every checkpoint, with timing wrappers installed by
    `install_phases(phases)` around the functions that do the work (for the per-call breakdown); rows `{**ck, what:
    result}`. The wrappers come off again even when a round fails."""
    fresh = Fresh(home / "scratch")
    ph = Phases()
    install_phases(ph)
    report["meta"]["phases_not_found"] = ph.missing
    results = []
    try:
        for ck in cks:
            print(f"   {ck['label']}: {what} vs copy ({rounds} rounds) ...", flush=True)
            results.append({**ck, what: bench(ck, rounds, fresh, ph)})
    finally:
        ph.restore()
    return results
