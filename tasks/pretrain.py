"""Prefect tasks of the pretraining stage: prepare the corpus, train (tracked), register the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from cpmant.configio import dump_config
from cpmant.errors import CpmantError
from cpmant.training.config import PretrainConfig
from cpmant.training.loop import TrainResult, pretrain
from cpmant.training.prepare import PreparedData, prepare_data

from .config import LifecycleConfig
from .plots import plot_loss
from .tracking import AsyncMetricLogger, MlflowCallbacks, finite, tracked_stage


def _flat_params(prefix: str, d: dict) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat_params(key + ".", v))
        else:
            out[key] = str(v)[:6000]
    return out


@task(name="prepare-corpus", cache_policy=NONE, retries=1, retry_delay_seconds=5)
def prepare_corpus(cfg: PretrainConfig) -> PreparedData:
    """Fetch/read the corpus, build its vocab, encode both splits (all cached by content hash)."""
    return prepare_data(cfg.corpus, cfg.preset, cfg.vocab_size, cfg.valid_fraction, cfg.seed, cfg.encode_workers)


def _train_multiprocess(cfg: PretrainConfig, logger: AsyncMetricLogger) -> TrainResult:
    """torchrun over `python -m cpmant.training`; the per-step metrics are read back from the machine log."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, res_path = Path(tmp) / "config.yaml", Path(tmp) / "result.json"
        dump_config(cfg, cfg_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
               "-m", "cpmant.training", "--config", str(cfg_path), "--result", str(res_path)]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0 or not res_path.exists():
            raise CpmantError(f"torchrun with {cfg.nproc} processes failed (exit {proc.returncode})",
                              "read the error above; rerun with --resume auto to continue from the last checkpoint")
        d = json.loads(res_path.read_text(encoding="utf-8"))
    d["run_dir"], d["model_dir"] = Path(d["run_dir"]), Path(d["model_dir"])
    res = TrainResult(**d)
    for line in (res.run_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        logger.log(rec["iter"], {"loss": rec["loss"], "lr": rec["lr"], "grad_norm": rec["grad_norm"],
                                 "tokens_per_second": rec["tokens_per_second"]})
    return res


@task(name="pretrain", cache_policy=NONE)
def train_model(cfg: LifecycleConfig, data: PreparedData) -> dict:
    """Pretrain with the torch backend inside a tracked MLflow run; returns the result and the run id."""
    import mlflow

    p = cfg.pretrain
    with tracked_stage(cfg.tracking, f"pretrain-{p.preset}", tags={"cpmant.stage": "pretrain"}) as run:
        mlflow.log_params(_flat_params("", p.model_dump(mode="json")))
        mlflow.log_params(_flat_params("data.", data.summary()))
        logger = AsyncMetricLogger(run.info.run_id, cfg.tracking.metric_flush_steps)
        try:
            if p.nproc > 1:
                res = _train_multiprocess(p, logger)
            else:
                res = pretrain(p, MlflowCallbacks(logger), prepared=data)
        finally:
            logger.close()
        mlflow.log_metrics(finite({
            "tokens_per_second": res.tokens_per_second, "mfu": res.mfu, "peak_flops": res.peak_flops,
            "valid_loss_start": res.valid_loss_start, "valid_loss_end": res.valid_loss_end,
            "final_loss": res.final_loss, "num_parameters": res.num_parameters, "tokens_seen": res.tokens_seen,
            "train_seconds": res.train_seconds,
        }))
        mlflow.set_tags({"cpmant.data_sha256": data.data_sha256, "cpmant.config_sha256": res.config_sha256,
                         "cpmant.preset": p.preset})
        mlflow.log_artifact(str(res.run_dir / "config.yaml"), artifact_path="config")
        mlflow.log_artifact(str(res.run_dir / "model_config.json"), artifact_path="config")
        log = res.run_dir / "train_log.jsonl"
        mlflow.log_artifact(str(log), artifact_path="logs")
        png = plot_loss(log, res.run_dir / "loss.png")
        if png:
            mlflow.log_artifact(str(png), artifact_path="plots")
    return {"result": res.to_json(), "run_id": run.info.run_id}


@task(name="register-model", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def register_model(trained: dict, name: str, stage: str = "pretrain", parent: str = "") -> str:
    """Register the trained checkpoint (inside its training run) as a new version with alias `candidate`."""
    import mlflow

    from registry.register import register_checkpoint
    from registry.tracking import setup_tracking

    setup_tracking()
    with mlflow.start_run(run_id=trained["run_id"]):
        reg = register_checkpoint(trained["result"]["model_dir"], name, stage=stage, parent=parent)
    return reg.uri
