"""The tuning loop: one delta method on one task, evaluated every epoch, the best epoch's delta kept.

    result = tune(model, tokenizer, task, train, valid, "lora", TuneConfig(epochs=3))
    save_delta(out, result.handle, base_dir, base_uri, task.name, result.report["best_metrics"])

Generic over a task object (cpmant.cuge's tasks): `task.training_loss(model, tokenizer, examples) -> scalar tensor`
(mean loss of a batch in CPM-Ant's fine-tuning format), `task.evaluate(model, tokenizer, examples, batch_size) ->
{metric: value}` and `task.primary_metric` (higher is better). AdamW over the trainable parameters only, seeded
(delta init, example order, dropout), early stop on the primary metric after `patience` epochs without a better
one. Callbacks: any object (or list of objects) with some of `on_step(step, loss)`, `on_eval(epoch, metrics)`,
`on_epoch_end(epoch, record)`; `progress` shows a tqdm bar.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CpmantError
from ..precision import autocast, resolve_precision
from ..training.state import seed_everything, seed_for
from .config import TuneConfig
from .methods import DeltaHandle, apply_delta, total_parameters


@dataclass
class TuneResult:
    handle: DeltaHandle  # the model carries the best epoch's delta when tune returns
    best_state: dict[str, torch.Tensor] = field(repr=False)
    report: dict[str, Any] = field(default_factory=dict)


def _callbacks(callbacks) -> list:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _call(cbs: list, name: str, *args) -> None:
    for cb in cbs:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)


def _evaluate(task, model, tokenizer, examples: list, batch_size: int, precision: str, device) -> dict[str, float]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(precision, device):
            metrics = task.evaluate(model, tokenizer, examples, batch_size)
    finally:
        model.train(was)
    return {k: float(v) for k, v in metrics.items()}


def evaluate_zero_shot(task, model, tokenizer, examples: list, cfg: TuneConfig | None = None) -> dict[str, float]:
    """The task's metrics of a model as it is (the zero-shot row of the comparison table)."""
    cfg = cfg or TuneConfig()
    examples = examples[: cfg.max_eval_examples] if cfg.max_eval_examples else examples
    device = next(model.parameters()).device
    return _evaluate(task, model, tokenizer, examples, cfg.eval_batch_size,
                     resolve_precision(cfg.precision, device), device)


def tune(model: torch.nn.Module, tokenizer, task, train_examples: list, valid_examples: list, method: str,
         cfg: TuneConfig | None = None, callbacks=None, progress: bool = True,
         params: dict | None = None) -> TuneResult:
    """Apply `method` to `model` (a loaded base, modified in place) and train its delta on `train_examples`.

    Returns the handle (its model holding the best epoch's delta), that delta's tensors, and a report: method,
    params, lr, trainable_params, total_params, trainable_ratio, history (per epoch: train_loss, metrics),
    best_epoch, best_metrics, primary_metric, epochs_run, stopped_early, seconds, examples_per_second."""
    cfg = cfg or TuneConfig()
    if not train_examples:
        raise CpmantError(f"no training examples for task {getattr(task, 'name', task)!r}",
                          "check the task's data folder (its train split is empty)")
    if not valid_examples:
        raise CpmantError(f"no validation examples for task {getattr(task, 'name', task)!r}",
                          "check the task's data folder (its valid split is empty)")
    primary = task.primary_metric
    train = list(train_examples[: cfg.max_train_examples] if cfg.max_train_examples else train_examples)
    valid = list(valid_examples[: cfg.max_eval_examples] if cfg.max_eval_examples else valid_examples)
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed, 0)  # the delta's init
    handle = apply_delta(model, method, params if params is not None else cfg.method_params.get(method))
    trainable = [p for _, p in handle.trainable()]
    lr = cfg.lr_for(method)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    cbs = _callbacks(callbacks)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"tune {getattr(task, 'name', '')} {method}",
                   unit="step", leave=False)
    history: list[dict] = []
    best_value, best_epoch, best_state, best_metrics = -math.inf, 0, handle.state_dict(), {}
    stale, step, t0, seen = 0, 0, time.perf_counter(), 0
    stopped_early = False
    try:
        for epoch in range(1, cfg.epochs + 1):
            order = list(range(len(train)))
            random.Random(seed_for(cfg.seed, epoch)).shuffle(order)
            model.train()
            losses = []
            for i in range(0, len(order), cfg.batch_size):
                batch = [train[j] for j in order[i: i + cfg.batch_size]]
                seed_everything(cfg.seed, epoch, i)  # dropout masks depend on (seed, epoch, position) only
                with autocast(precision, device):
                    loss = task.training_loss(model, tokenizer, batch)
                value = float(loss.detach())  # one wait for the device per step
                if not math.isfinite(value):
                    raise CpmantError(f"the {method} loss became {value} at epoch {epoch}",
                                      f"lower its learning rate (tune.lr.{method}, now {lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                step += 1
                seen += len(batch)
                losses.append(value)
                _call(cbs, "on_step", step, losses[-1])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch)
            metrics = _evaluate(task, model, tokenizer, valid, cfg.eval_batch_size, precision, device)
            if primary not in metrics:
                raise CpmantError(f"task {getattr(task, 'name', task)!r} reported no {primary!r} "
                                  f"(it gave {sorted(metrics)})", "the task's evaluate must return its primary metric")
            record = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "metrics": metrics, "step": step}
            history.append(record)
            _call(cbs, "on_eval", epoch, metrics)
            _call(cbs, "on_epoch_end", epoch, record)
            if metrics[primary] > best_value:
                best_value, best_epoch, best_metrics = metrics[primary], epoch, metrics
                best_state = {k: v.detach().clone() for k, v in handle.state_dict().items()}
                stale = 0
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience and epoch < cfg.epochs:
                    stopped_early = True
                    break
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    params_by_name = dict(model.named_parameters())
    with torch.no_grad():  # the model ends holding the best epoch's delta
        for n, t in best_state.items():
            params_by_name[n].copy_(t)
    model.eval()
    n_train, n_total = handle.num_trainable, total_parameters(model)
    report = {
        "method": method, "params": handle.params.model_dump(mode="json"), "lr": lr,
        "trainable_params": n_train, "total_params": n_total, "trainable_ratio": n_train / max(n_total, 1),
        "primary_metric": primary, "history": history, "best_epoch": best_epoch, "best_metrics": best_metrics,
        "epochs_run": len(history), "stopped_early": stopped_early, "steps": step, "seconds": seconds,
        "examples_per_second": seen / seconds if seconds > 0 else 0.0, "precision": precision,
        "train_examples": len(train), "valid_examples": len(valid),
    }
    return TuneResult(handle, best_state, report)
