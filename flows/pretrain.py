"""The pretraining stage as a Prefect flow."""

from __future__ import annotations

from prefect import flow

from tasks.config import LifecycleConfig
from tasks.pretrain import prepare_corpus, register_model, train_model


@flow(name="pretrain", log_prints=True)
def pretrain_flow(config: dict | None = None) -> dict:
    """Pretrain a CPM-Ant model and register it.

    Steps:
      1. prepare-corpus: fetch/read the corpus, clean and deduplicate, build the vocab, encode (cached)
      2. pretrain: train with the torch backend, tracked in MLflow (loss, throughput, MFU, energy, cost)
      3. register-model: register `cpm-ant-<preset>` with the contract's tags and alias `candidate`
    """
    cfg = LifecycleConfig.model_validate(config or {})
    data = prepare_corpus(cfg.pretrain)
    trained = train_model(cfg, data)
    uri = register_model(trained, f"cpm-ant-{cfg.pretrain.preset}", stage="pretrain")
    return {"model_uri": uri, "run_id": trained["run_id"], **{k: trained["result"][k] for k in (
        "valid_loss_start", "valid_loss_end", "tokens_per_second", "mfu", "steps", "model_dir")}}
