"""A micro lifecycle in a store of its own, built once per test session and shared by the report, rerun, notebook
and browser tests: a micro pretrain (tests/conftest.py's micro model on the fixture corpus) and one compression
rung (3b, a few distillation steps), both through their Prefect flows, so the store holds exactly what the
lifecycle logs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from conftest import FIXTURES, MICRO_MODEL


def micro_config(home: Path) -> dict:
    """The lifecycle config of the micro lifecycle (pretrain + compress sections, a 1 s power sampling)."""
    return {
        "pretrain": dict(preset="tiny", model_overrides=MICRO_MODEL, corpus=str(FIXTURES / "corpus"), vocab_size=600,
                         seq_len=64, micro_batch_size=4, max_steps=8, warmup_steps=2, lr=0.05, eval_interval=4,
                         eval_rows=8, save_interval=8, encode_workers=1, num_threads=1, min_piece_tokens=4,
                         valid_fraction=0.25),
        "compress": {"recipes": "3b", "distill_steps": 3, "distill_batch_size": 4, "importance_rows": 8,
                     "batch_size": 4, "gen_tokens": 4, "gen_repeats": 1},
        "tracking": {"measure_power_secs": 1},
    }


_BUILT: dict[str, dict] = {}


def build(home: Path | None = None) -> dict:
    """Run the micro lifecycle into `home` (a new temporary folder by default) as CPMANT_HOME, once per process.
    Needs Prefect's API (the tests' `prefect_harness`). Returns {"home", "config", "pretrain", "compress",
    "tracking_uri"}; CPMANT_HOME is restored afterwards."""
    key = str(home)
    if key in _BUILT:
        return _BUILT[key]
    import mlflow

    from flows.compress import compress_flow
    from flows.pretrain import pretrain_flow

    home = Path(home or tempfile.mkdtemp(prefix="cpmant-micro-lifecycle-"))
    old = os.environ.get("CPMANT_HOME")
    os.environ["CPMANT_HOME"] = str(home)
    try:
        cfg = micro_config(home)
        pre = pretrain_flow(cfg)
        comp = compress_flow(pre["model_uri"], None, cfg)
    finally:
        if old is None:
            os.environ.pop("CPMANT_HOME", None)
        else:
            os.environ["CPMANT_HOME"] = old
        mlflow.set_tracking_uri(None)
    out = {"home": home, "config": cfg, "pretrain": pre, "compress": comp,
           "tracking_uri": f"sqlite:///{home / 'mlflow.db'}"}
    _BUILT[key] = out
    return out
