"""The pretraining stage as a Prefect flow."""

from __future__ import annotations

import time

from prefect import flow

from tasks.pretrain import (find_pretrained, model_name, prepare_corpus, register_model, reused_pretrained,
                            train_model)

from .config import LifecycleConfig, forced
from .summary import summary_row

RESULT_KEYS = ("valid_loss_start", "valid_loss_end", "tokens_per_second", "mfu", "steps", "model_dir", "precision")


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: dict | None = None, force: bool | list[str] = False) -> dict:
    """Pretrain a CPM-Ant model and register it.

    Steps:
      1. prepare-corpus: fetch/read the corpus, clean and deduplicate, build the vocab, encode (cached)
      2. find: the stage's reuse key (resolved settings, data and vocab hashes, code version) is looked up once
         among the versions of `cpm-ant-<preset>`; a version made with it is returned as it is (no run, no
         training) and the reason printed ("pretrain: reused models:/cpm-ant-tiny/1: same key ..."); `force` skips it
      3. pretrain: train, tracked in MLflow (loss, throughput, MFU, energy, cost); the key is written beside the
         run's model, so a finished training whose registration failed is registered without training again
      4. register-model: register `cpm-ant-<preset>` in the training run with the contract's tags, the key and
         alias `candidate` (first version, or inside the lifecycle) or `challenger` (tasks/candidates.py)
    """
    cfg = LifecycleConfig.model_validate(config or {})
    force = forced(force, "pretrain")
    t0 = time.perf_counter()
    data = prepare_corpus(cfg.pretrain)
    reuse = find_pretrained(cfg.pretrain, cfg.tracking, data, force)
    if reuse.reused:
        # a `Reused` state (its message the reason): its result is the version's row
        out = dict(reused_pretrained(reuse, cfg.pretrain, cfg.tracking, return_state=True).result())
    else:
        trained = train_model(cfg.pretrain, cfg.tracking, data, reuse.key, force=force)
        uri = register_model(trained, model_name(cfg.pretrain), reuse.key, stage="pretrain", tracking=cfg.tracking)
        res = trained["result"]
        out = {"model_uri": uri, "run_id": trained["run_id"], "reused": False,
               "reason": trained.get("reason") or reuse.reason, **{k: res[k] for k in RESULT_KEYS}}
    out["seconds"] = time.perf_counter() - t0
    out["summary"] = [summary_row("pretrain", out["model_uri"], "valid_loss", out.get("valid_loss_end"),
                                  out["seconds"], out["reused"], reason=out["reason"],
                                  note=f"precision {out['precision']}" if out.get("precision") else "")]
    return out

