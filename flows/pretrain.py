"""The pretraining stage as a Prefect flow."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from tasks.caching import cached, was_cached
from tasks.pretrain import find_pretrained, model_name, prepare_corpus, register_model, run_folder, train_model

from .config import LifecycleConfig, forced
from .summary import summary_row


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: dict | None = None, force: bool | list[str] = False) -> dict:
    """Pretrain a CPM-Ant model and register it.

    Steps:
      1. prepare-corpus: fetch/read the corpus, clean and deduplicate, build the vocab, encode (cached)
      2. find: a version of `cpm-ant-<preset>` made from the same config, data and code is returned as it is
         (no run, no training); `force` skips this
      3. pretrain: train, tracked in MLflow (loss, throughput, MFU, energy, cost); its result is cached by Prefect
         (tasks/caching.py: config, data and code hashes), so a finished training whose registration failed is
         registered without training again
      4. register-model: register `cpm-ant-<preset>` in the training run with the contract's tags and alias
         `candidate` (first version, or inside the lifecycle) or `challenger` (tasks/aliases.py)
    """
    cfg = LifecycleConfig.model_validate(config or {})
    force = forced(force, "pretrain")
    t0 = time.perf_counter()
    data = prepare_corpus(cfg.pretrain)
    found = None if force else find_pretrained(cfg.pretrain, cfg.tracking, data)
    if found is not None:
        out = found
    else:
        train = cached(train_model, force=force)
        state = train(cfg.pretrain, cfg.tracking, data, force=force, return_state=True)
        trained = state.result()
        if was_cached(state) and not Path(trained["result"]["model_dir"]).is_dir():
            # the cached result's checkpoint is gone: train again (and replace the cached result)
            trained = cached(train_model, force=True)(cfg.pretrain, cfg.tracking, data, force=force)
        uri = register_model(trained, model_name(cfg.pretrain), stage="pretrain", tracking=cfg.tracking)
        res = trained["result"]
        out = {"model_uri": uri, "run_id": trained["run_id"], "reused": False,
               **{k: res[k] for k in ("valid_loss_start", "valid_loss_end", "tokens_per_second", "mfu", "steps",
                                      "model_dir", "precision")}}
    out["seconds"] = time.perf_counter() - t0
    out["summary"] = [summary_row("pretrain", out["model_uri"], "valid_loss", out.get("valid_loss_end"),
                                  out["seconds"], out["reused"],
                                  note=f"precision {out['precision']}" if out.get("precision") else "")]
    return out


def pretrain_run_folder(config: dict | None = None) -> str:
    """Where `cpmant pretrain` with this config keeps its checkpoints (what `--resume auto` continues)."""
    return str(run_folder(LifecycleConfig.model_validate(config or {}).pretrain))
