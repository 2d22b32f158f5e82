"""Prefect tasks of the pretraining stage: prepare the corpus, decide reuse by the stage's one key (tasks/reuse.py:
cpmant.training.runs.reuse_key over the resolved settings, the data and vocab hashes and the code version), train
(tracked) unless the run folder holds the finished training of that key, register the model inside its training
run with the key. MLflow is reached through registry/ (runs.py, stage_records.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from cpmant.checkpoint import git_sha
from cpmant.configio import dump_config
from cpmant.errors import CpmantError
from cpmant.threads import worker_env
from cpmant.training.loop import TrainResult, config_sha256, resolve_run_dir
from cpmant.training.loop import pretrain as pretrain_fn
from cpmant.training.prepare import PreparedData, prepare_data
from cpmant.training.runs import finished, reuse_key, write_finished
from registry import runs, stage_records
from registry.tags import CONFIG_SHA256, DATA_SHA256, GIT_SHA, HELDOUT_SHA256, INPUTS_SHA256, PRESET, STAGE
from registry.tracking import setup_tracking

from .candidates import new_version_alias
from .config import PretrainConfig, TrackingConfig
from .outcomes import log_lines, pretrain_lines
from .plots import plot_loss
from .reuse import SHORT, Reuse, decide, reused_state
from .metering import (STEP_METRIC_NAMES, AsyncMetricLogger, MlflowCallbacks, default_sigterm, retry_transient,
                       tracked_stage)
from .metering import recorded_tracking as _recorded_tracking

# the tag of training tasks: a Prefect tag concurrency limit of 1 on it (infra/up.sh) runs one training at a time
TRAINING_TAG = "cpmant-training"
SUMMARY_KEYS = ("valid_loss_start", "valid_loss_end", "tokens_per_second", "mfu", "steps", "model_dir")


def _flat_params(prefix: str, d: dict) -> dict[str, str]:
    """Nested settings as flat `a.b` params (registry.runs.log_params cuts them to MLflow's limit)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat_params(key + ".", v))
        else:
            out[key] = str(v)
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


@task(name="find-pretrained", task_run_name="find-{pretrain.preset}", cache_policy=NONE, retries=1,
      retry_delay_seconds=2, retry_condition_fn=retry_transient)
def find_pretrained(pretrain: PretrainConfig, tracking: TrackingConfig, data: PreparedData,
                    force: bool = False) -> Reuse:
    """The stage's one reuse decision: the newest version of `cpm-ant-<preset>` registered with this reuse key
    (tag cpmant.inputs_sha256), unless `force`. Prints why (tasks/reuse.py)."""
    setup_tracking(tracking.experiment)
    key = reuse_key(pretrain, data.data_sha256, data.vocab_sha256)
    name = model_name(pretrain)
    return decide("pretrain", key, None if force else stage_records.find_by_key(name, key), name, force)


@task(name="reuse-pretrained", task_run_name="reuse-{pretrain.preset}", cache_policy=NONE, retries=1,
      retry_delay_seconds=2, retry_condition_fn=retry_transient)
def reused_pretrained(reuse: Reuse, pretrain: PretrainConfig, tracking: TrackingConfig):
    """The reused version's result (its run's summary metrics), as a `Reused` state whose message is the reason."""
    setup_tracking(tracking.experiment)
    s = stage_records.version_summary(reuse.found, SUMMARY_KEYS)
    return reused_state(reuse, {"model_uri": reuse.found, "run_id": s["run_id"], "reused": True,
                                "reason": reuse.reason, "steps": pretrain.max_steps, "model_dir": None,
                                "precision": s["params"].get("precision"), **s["metrics"]})


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


def _recorded_training(run_dir: Path, key: str) -> dict | None:
    """The finished training of `key` in the run folder (its MLflow run still there), e.g. one whose registration
    failed: registered without training again."""
    rec = finished(run_dir, key)
    if rec is None or not stage_records.run_exists(rec.get("run_id")):
        return None
    reason = (f"pretrain: registering the finished training in {run_dir} (MLflow run {rec['run_id']}): same key "
              f"{key[:SHORT]}")
    log_lines(reason)
    result = {**rec["result"], "run_dir": str(run_dir), "model_dir": str(Path(run_dir) / "model")}  # a moved home
    return {"result": result, "run_id": rec["run_id"], "reason": reason}


def _record_result(run, res: TrainResult, data: PreparedData, preset: str) -> None:
    """The training's summary metrics at its final step, its identity tags, its config, log and loss plot."""
    run.final_step = res.steps
    run.log_final({
        "tokens_per_second": res.tokens_per_second, "mfu": res.mfu, "peak_flops": res.peak_flops,
        "valid_loss_start": res.valid_loss_start, "valid_loss_end": res.valid_loss_end,
        "final_loss": res.final_loss, "num_parameters": res.num_parameters, "tokens_seen": res.tokens_seen,
        "train_seconds": res.train_seconds,
    })
    runs.set_tags({DATA_SHA256: data.data_sha256, CONFIG_SHA256: res.config_sha256, PRESET: preset,
                   # the rows valid_loss_* were measured on (cpmant/heldout.py): validation's are the same
                   HELDOUT_SHA256: res.heldout_sha256})
    runs.log_artifact(str(res.run_dir / "config.yaml"), "config")
    runs.log_artifact(str(res.run_dir / "model_config.json"), "config")
    log = res.run_dir / "train_log.jsonl"
    runs.log_artifact(str(log), "logs")
    png = plot_loss(log, res.run_dir / "loss.png")
    if png:
        runs.log_artifact(str(png), "plots")


@task(name="pretrain", task_run_name="pretrain-{pretrain.preset}", cache_policy=NONE,
      tags=[TRAINING_TAG], retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient)
def train_model(pretrain: PretrainConfig, tracking: TrackingConfig, data: PreparedData, key: str,
                force: bool = False) -> dict:
    """Pretrain inside a tracked MLflow run; returns the result and the run id, and writes them with the reuse
    `key` beside the run's model (cpmant.training.runs.write_finished). The run folder's finished training of the
    same key is returned as it is (no run, no training) unless `force`. The summary metrics are logged at the final
    step, beside the last loss, where the registered model reads them. `force`: start from step 0 even when the
    run folder holds checkpoints of this config (`resume: auto` would return the finished model)."""
    p = pretrain
    if not force and (done := _recorded_training(run_folder(p), key)):
        return done
    if force and p.resume == "auto":
        p = p.model_copy(update={"resume": "never"})
    with tracked_stage(tracking, f"pretrain-{p.preset}", tags={STAGE: "pretrain"}) as run:
        runs.log_params(resolved_params(p, data))
        # the whole resolved config and the code version, for `cpmant rerun` (where runs nest is not an input)
        runs.log_dict({"pretrain": p.model_dump(mode="json"), "tracking": _recorded_tracking(tracking)},
                      "config.json")
        runs.set_tags({GIT_SHA: git_sha(), INPUTS_SHA256: key})
        logger = AsyncMetricLogger(run.info.run_id, tracking.metric_flush_steps)
        try:
            if p.nproc > 1 or int(getattr(p, "nnodes", 1) or 1) > 1:
                res = _train_multiprocess(p, logger)
            else:
                res = pretrain_fn(p, MlflowCallbacks(logger), prepared=data)
        finally:
            logger.close()
        _record_result(run, res, data, p.preset)
    trained = {"result": res.to_json(), "run_id": run.info.run_id}
    write_finished(res.run_dir, key, trained)  # the key beside the result: a failed registration retrains nothing
    log_lines(*pretrain_lines(res, run.info.run_id))  # the task run's log in Prefect
    return trained


def describe(result: dict) -> str:
    """A version's description: what it is, in one line."""
    corpus = (result.get("data") or {}).get("corpus") or "its corpus"
    return (f"pretrained {result['steps']} steps on {corpus}: {result['num_parameters'] / 1e6:.2f} M parameters, "
            f"held-out loss {result['valid_loss_end']:.3f}")


@task(name="register-model", task_run_name="register-{name}", cache_policy=NONE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def register_model(trained: dict, name: str, key: str, stage: str = "pretrain", parent: str = "",
                   tracking: TrackingConfig | None = None) -> str:
    """Register the trained checkpoint as a new version tagged with the reuse `key`, logged in its training run at
    the run's final step, with alias `candidate` (the model's first version, or inside the lifecycle) or
    `challenger` (tasks/candidates.py)."""
    tracking = tracking or TrackingConfig()
    setup_tracking(tracking.experiment)
    res = trained["result"]
    reg = stage_records.register_in_run(trained["run_id"], res["model_dir"], name, key, stage=stage, parent=parent,
                                        description=f"{name}: {describe(res)}",
                                        alias=new_version_alias(tracking, name), step=int(res["steps"]))
    return reg.uri
