"""Prefect tasks of the pretraining stage: prepare the corpus, find an identical earlier result, train (tracked),
register the model inside its training run."""

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
from cpmant.threads import worker_env
from cpmant.training.loop import TrainResult, config_sha256, resolve_run_dir
from cpmant.training.loop import pretrain as pretrain_fn
from cpmant.training.prepare import PreparedData, prepare_data

from .caching import ContentHash
from .config import PretrainConfig, TrackingConfig
from .outcomes import log_lines, pretrain_lines
from .plots import plot_loss
from .tracking import (STEP_METRIC_NAMES, AsyncMetricLogger, MlflowCallbacks, default_sigterm, retry_transient,
                       tracked_stage)
from .tracking import recorded_tracking as _recorded_tracking

# the tag of training tasks: a Prefect tag concurrency limit of 1 on it (infra/up.sh) runs one training at a time
TRAINING_TAG = "cpmant-training"
SUMMARY_KEYS = ("valid_loss_start", "valid_loss_end", "tokens_per_second", "mfu", "steps", "model_dir")


def _flat_params(prefix: str, d: dict) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat_params(key + ".", v))
        else:
            out[key] = str(v)[:6000]
    return out


def model_name(pretrain: PretrainConfig) -> str:
    """The registered model a pretraining config makes: `cpm-ant-<preset>`."""
    return f"cpm-ant-{pretrain.preset}"


def run_folder(pretrain: PretrainConfig) -> Path:
    """The run folder (checkpoints, logs) of a pretraining config: where an interrupted run resumes from."""
    return resolve_run_dir(pretrain)


@task(name="prepare-corpus", task_run_name="prepare-corpus-{pretrain.preset}", cache_policy=NONE, retries=1,
      retry_delay_seconds=5, retry_condition_fn=retry_transient)
def prepare_corpus(pretrain: PretrainConfig) -> PreparedData:
    """Fetch/read the corpus, build its vocab, encode both splits (all cached by content hash). Retried only for
    transient failures (a download), never for a bad corpus."""
    with default_sigterm():
        return prepare_data(pretrain.corpus, pretrain.preset, pretrain.vocab_size, pretrain.valid_fraction,
                            pretrain.seed, pretrain.encode_workers)


def reuse_match(pretrain: PretrainConfig, data: PreparedData) -> dict[str, str]:
    """The version tags that identify a pretraining result: its config hash (the fields that affect weights or
    metrics), its data hash and the code version."""
    from cpmant.checkpoint import git_sha
    from registry.tags import CONFIG_SHA256, DATA_SHA256, GIT_SHA

    return {CONFIG_SHA256: config_sha256(pretrain), DATA_SHA256: data.data_sha256, GIT_SHA: git_sha()}


@task(name="find-pretrained", task_run_name="find-{pretrain.preset}", cache_policy=NONE, retries=1,
      retry_delay_seconds=2, retry_condition_fn=retry_transient)
def find_pretrained(pretrain: PretrainConfig, tracking: TrackingConfig, data: PreparedData) -> dict | None:
    """The registered version of `cpm-ant-<preset>` made from the same config, data and code, with its run's
    summary metrics; None when there is none."""
    from mlflow.tracking import MlflowClient

    from registry.register import find_version
    from registry.tracking import setup_tracking

    setup_tracking(tracking.experiment)
    uri = find_version(model_name(pretrain), reuse_match(pretrain, data))
    if uri is None:
        return None
    client = MlflowClient()
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    mv = client.get_model_version(name, version)
    data_ = client.get_run(mv.run_id).data if mv.run_id else None
    metrics = data_.metrics if data_ else {}
    print(f"reusing {uri}: same config, data and code (pass --force to train again)")
    return {"model_uri": uri, "run_id": mv.run_id, "reused": True, "steps": pretrain.max_steps,
            "model_dir": None, "precision": (data_.params if data_ else {}).get("precision"),
            **{k: metrics.get(k) for k in SUMMARY_KEYS if k in metrics}}


def torchrun_args(cfg: PretrainConfig) -> list[str]:
    """torchrun's launch flags: one node (`--standalone`), or `nnodes` nodes meeting at `rdzv_endpoint`
    (HOST:PORT, the c10d rendezvous on node 0) with this node's `node_rank`; every node runs the same flow with
    the same config but its own node_rank, and node 0 (global rank 0) writes the checkpoints and the result."""
    nnodes = int(getattr(cfg, "nnodes", 1) or 1)
    if nnodes <= 1:
        return ["--standalone", f"--nproc-per-node={cfg.nproc}"]
    endpoint = getattr(cfg, "rdzv_endpoint", None)
    if not endpoint:
        raise CpmantError(f"pretrain.nnodes={nnodes} needs pretrain.rdzv_endpoint",
                          "set pretrain.rdzv_endpoint=HOST:PORT (node 0's address, reachable from every node)")
    return [f"--nnodes={nnodes}", f"--nproc-per-node={cfg.nproc}", f"--node-rank={int(getattr(cfg, 'node_rank', 0))}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={getattr(cfg, 'rdzv_id', None) or 'cpmant-' + config_sha256(cfg)[:12]}"]


def _train_multiprocess(cfg: PretrainConfig, logger: AsyncMetricLogger) -> TrainResult:
    """torchrun over `python -m cpmant.training`; the per-step metrics are read back from the machine log."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, res_path = Path(tmp) / "config.yaml", Path(tmp) / "result.json"
        dump_config(cfg, cfg_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg),
               "-m", "cpmant.training", "--config", str(cfg_path), "--result", str(res_path)]
        proc = subprocess.run(cmd, env=worker_env(1))
        if proc.returncode != 0 or not res_path.exists():
            nodes = getattr(cfg, "nnodes", 1)
            raise CpmantError(f"torchrun with {cfg.nproc} processes x {nodes} node(s) failed "
                              f"(exit {proc.returncode})" + ("" if proc.returncode else
                                                             "; this node wrote no result (only node 0 does)"),
                              "read the error above; rerun with --resume auto to continue from the last checkpoint")
        d = json.loads(res_path.read_text(encoding="utf-8"))
    d["run_dir"], d["model_dir"] = Path(d["run_dir"]), Path(d["model_dir"])
    res = TrainResult(**d)
    for line in (res.run_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        logger.log(rec["iter"], {"loss": rec["loss"], "lr": rec["lr"], "grad_norm": rec["grad_norm"],
                                 STEP_METRIC_NAMES["tokens_per_second"]: rec["tokens_per_second"]})
    return res


def resolved_params(pretrain: PretrainConfig, data: PreparedData) -> dict[str, str]:
    """The config as it ran: the corpus's real path (or the default corpus's name), the vocab size the corpus gave,
    the device actually used, `precision` as used (fp32 / bf16) beside `precision_setting` (auto / fp32 / bf16);
    then the data summary under `data.`."""
    from cpmant.training.runs import configured_device, run_precision

    vocab_size = len(Path(data.vocab_path).read_text(encoding="utf-8").splitlines())
    device = configured_device(pretrain.device)
    corpus = str(Path(pretrain.corpus).expanduser().resolve()) if pretrain.corpus else data.corpus_name
    resolved = {**pretrain.model_dump(mode="json"), "corpus": corpus, "vocab_size": vocab_size, "device": device,
                "precision": run_precision(pretrain), "precision_setting": pretrain.precision}
    return {**_flat_params("", resolved), **_flat_params("data.", data.summary())}


@task(name="pretrain", task_run_name="pretrain-{pretrain.preset}", cache_policy=ContentHash(),
      tags=[TRAINING_TAG], retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient)
def train_model(pretrain: PretrainConfig, tracking: TrackingConfig, data: PreparedData, force: bool = False) -> dict:
    """Pretrain inside a tracked MLflow run; returns the result and the run id. The summary metrics are logged at
    the final step, beside the last loss, where the registered model reads them. `force`: start from step 0 even
    when the run folder holds checkpoints of this config (`resume: auto` would return the finished model)."""
    import mlflow

    from cpmant.checkpoint import git_sha
    from registry.tags import CONFIG_SHA256, DATA_SHA256, GIT_SHA, PRESET, STAGE

    p = pretrain
    if force and p.resume == "auto":
        p = p.model_copy(update={"resume": "never"})
    with tracked_stage(tracking, f"pretrain-{p.preset}", tags={STAGE: "pretrain"}) as run:
        mlflow.log_params(resolved_params(p, data))
        # the whole resolved config and the code version, for `cpmant rerun` (where runs nest is not an input)
        mlflow.log_dict({"pretrain": p.model_dump(mode="json"), "tracking": _recorded_tracking(tracking)},
                        "config.json")
        mlflow.set_tag(GIT_SHA, git_sha())
        logger = AsyncMetricLogger(run.info.run_id, tracking.metric_flush_steps)
        try:
            if p.nproc > 1 or int(getattr(p, "nnodes", 1) or 1) > 1:
                res = _train_multiprocess(p, logger)
            else:
                res = pretrain_fn(p, MlflowCallbacks(logger), prepared=data)
        finally:
            logger.close()
        run.final_step = res.steps
        run.log_final({
            "tokens_per_second": res.tokens_per_second, "mfu": res.mfu, "peak_flops": res.peak_flops,
            "valid_loss_start": res.valid_loss_start, "valid_loss_end": res.valid_loss_end,
            "final_loss": res.final_loss, "num_parameters": res.num_parameters, "tokens_seen": res.tokens_seen,
            "train_seconds": res.train_seconds,
        })
        mlflow.set_tags({DATA_SHA256: data.data_sha256, CONFIG_SHA256: res.config_sha256, PRESET: p.preset,
                         # the rows valid_loss_* were measured on (cpmant/heldout.py): validation's are the same
                         "cpmant.heldout_sha256": res.heldout_sha256})
        mlflow.log_artifact(str(res.run_dir / "config.yaml"), artifact_path="config")
        mlflow.log_artifact(str(res.run_dir / "model_config.json"), artifact_path="config")
        log = res.run_dir / "train_log.jsonl"
        mlflow.log_artifact(str(log), artifact_path="logs")
        png = plot_loss(log, res.run_dir / "loss.png")
        if png:
            mlflow.log_artifact(str(png), artifact_path="plots")
    log_lines(*pretrain_lines(res, run.info.run_id))  # the task run's log in Prefect
    return {"result": res.to_json(), "run_id": run.info.run_id}


def describe(result: dict) -> str:
    """A version's description: what it is, in one line."""
    corpus = (result.get("data") or {}).get("corpus") or "its corpus"
    return (f"pretrained {result['steps']} steps on {corpus}: {result['num_parameters'] / 1e6:.2f} M parameters, "
            f"held-out loss {result['valid_loss_end']:.3f}")


def _register(model_dir, name: str, stage: str, parent: str, step: int, description: str, alias: str | None):
    """registry.register.register_checkpoint, logging the model at `step` (the training run's final step, so the
    logged model shows the final metrics) where the registry takes a step."""
    import inspect

    from registry.register import register_checkpoint

    kw = {"step": step} if "step" in inspect.signature(register_checkpoint).parameters else {}
    return register_checkpoint(model_dir, name, stage=stage, parent=parent, description=description, alias=alias,
                               **kw)


@task(name="register-model", task_run_name="register-{name}", cache_policy=NONE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def register_model(trained: dict, name: str, stage: str = "pretrain", parent: str = "",
                   tracking: TrackingConfig | None = None) -> str:
    """Register the trained checkpoint as a new version, logged in its training run at the run's final step, with
    alias `candidate` (the model's first version, or inside the lifecycle) or `challenger` (tasks/aliases.py)."""
    import mlflow

    from registry.tracking import setup_tracking

    from .aliases import new_version_alias

    tracking = tracking or TrackingConfig()
    setup_tracking(tracking.experiment)
    alias = new_version_alias(tracking, name)
    with mlflow.start_run(run_id=trained["run_id"]):
        res = trained["result"]
        reg = _register(res["model_dir"], name, stage, parent, int(res["steps"]), f"{name}: {describe(res)}", alias)
    return reg.uri
