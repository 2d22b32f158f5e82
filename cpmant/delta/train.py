"""The tuning loop: one delta method on one task, evaluated every epoch, the best epoch's delta kept; the lr sweep.

    result = tune(model, tokenizer, task, train, valid, "lora", TuneConfig(epochs=3))
    save_delta(out, result.handle, base_dir, base_uri, task.name, result.report["best_metrics"])
    sweep = sweep_lr(lambda: load_pretrained(base)[0], tokenizer, task, train, valid, "full", cfg)  # .best, .rows

Generic over a task object (cpmant.cuge's tasks): `task.training_loss(model, tokenizer, examples) -> scalar tensor`
(mean loss of a batch in CPM-Ant's fine-tuning format), `task.evaluate(model, tokenizer, examples, batch_size) ->
{metric: value}` and `task.primary_metric` (higher is better). AdamW over the trainable parameters only, linear
warmup then cosine decay, weight decay and clip as TuneConfig says, seeded (delta init, example order, dropout).
Epoch 0, the untuned start, is scored on the valid split first and is the best until an epoch beats it, so the
delta returned is never worse on valid than the start (a diverging run stops and keeps its best epoch). Early stop
on the primary metric after `patience` epochs without a better one. `sweep_lr` tunes once per lr of the method's
grid from a fresh base and keeps the run with the best valid score. Callbacks: any object (or list of objects)
with some of `on_step(step, loss)`, `on_eval(epoch, metrics)` (epoch 0 too), `on_epoch_end(epoch, record)`;
`progress` shows a tqdm bar.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import CpmantError
from ..precision import autocast, resolve_precision
from ..training.schedule import cosine
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


def _evaluate(task, model, tokenizer, examples: list, batch_size: int, precision: str, device,
              zero_shot: bool = False) -> dict[str, float]:
    was = model.training
    model.eval()
    kw = {"zero_shot": True} if zero_shot else {}  # a task without the keyword still scores tuned models
    try:
        with torch.no_grad(), autocast(precision, device):
            metrics = task.evaluate(model, tokenizer, examples, batch_size, **kw)
    finally:
        model.train(was)
    return {k: float(v) for k, v in metrics.items()}


def evaluate_model(task, model, tokenizer, examples: list, cfg: TuneConfig | None = None,
                   zero_shot: bool = False) -> dict[str, float]:
    """The task's metrics of a tuned model (its tuning prompt), or of an untuned base with `zero_shot` (the prompt
    the base was pretrained with)."""
    cfg = cfg or TuneConfig()
    examples = examples[: cfg.max_eval_examples] if cfg.max_eval_examples else examples
    device = next(model.parameters()).device
    return _evaluate(task, model, tokenizer, examples, cfg.eval_batch_size,
                     resolve_precision(cfg.precision, device), device, zero_shot=zero_shot)


def evaluate_zero_shot(task, model, tokenizer, examples: list, cfg: TuneConfig | None = None) -> dict[str, float]:
    """The task's metrics of a base as it is, scored with its pretraining prompt (the zero-shot row)."""
    return evaluate_model(task, model, tokenizer, examples, cfg, zero_shot=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TuneConfig, total_steps: int):
    """Linear warmup over warmup_ratio of total_steps, then cosine decay (LambdaLR stepped once per optimizer step).

    The cosine reaches min_lr_ratio one step after the last (total_steps + 1), so the last step still learns."""
    warmup = max(1, round(cfg.warmup_ratio * total_steps)) if cfg.warmup_ratio > 0 else 0
    return torch.optim.lr_scheduler.LambdaLR(opt, cosine(warmup, total_steps + 1, cfg.min_lr_ratio)), warmup


def _check_primary(task, metrics: dict, primary: str) -> None:
    if primary not in metrics:
        raise CpmantError(f"task {getattr(task, 'name', task)!r} reported no {primary!r} (it gave {sorted(metrics)})",
                          "the task's evaluate must return its primary metric")


def _snapshot(handle: DeltaHandle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.state_dict().items()}


def tune(model: torch.nn.Module, tokenizer, task, train_examples: list, valid_examples: list, method: str,
         cfg: TuneConfig | None = None, callbacks=None, progress: bool = True,
         params: dict | None = None, start_metrics: dict[str, float] | None = None) -> TuneResult:
    """Apply `method` to `model` (a loaded base, modified in place) and train its delta on `train_examples`.

    Epoch 0 is the untuned start, scored on the valid examples (or `start_metrics`, its known scores) and kept when
    no epoch beats it. Returns the handle (its model holding the best epoch's delta), that delta's tensors, and a
    report: method, params, lr, warmup_steps, total_steps, trainable_params, total_params, trainable_ratio, history
    (per epoch from 0: train_loss (None at 0), metrics), best_epoch, best_metrics, primary_metric, epochs_run
    (trained epochs), stopped_early, diverged, seconds, examples_per_second."""
    cfg = cfg or TuneConfig()
    for split, ex in (("train", train_examples), ("validation", valid_examples)):
        if not ex:
            raise CpmantError(f"no {split} examples for task {getattr(task, 'name', task)!r}",
                              f"check the task's data folder (its {'valid' if split != 'train' else split} split "
                              "is empty)")
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
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    sched, warmup = make_scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    cbs = _callbacks(callbacks)
    evaluate = lambda: _evaluate(task, model, tokenizer, valid, cfg.eval_batch_size, precision, device)  # noqa: E731
    t0 = time.perf_counter()
    start = dict(start_metrics) if start_metrics is not None else evaluate()
    _check_primary(task, start, primary)
    history: list[dict] = [{"epoch": 0, "train_loss": None, "metrics": start, "step": 0}]
    _call(cbs, "on_eval", 0, start)
    best_value, best_epoch, best_state, best_metrics = start[primary], 0, _snapshot(handle), start
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"tune {getattr(task, 'name', '')} {method}",
                   unit="step", leave=False)
    stale, step, seen = 0, 0, 0
    stopped_early = diverged = False
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
                    diverged = True
                    warnings.warn(f"the {method} loss became {value} at epoch {epoch} (lr {lr:g}): training stops "
                                  f"and keeps epoch {best_epoch}; lower tune.lr.{method}", stacklevel=2)
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                seen += len(batch)
                losses.append(value)
                _call(cbs, "on_step", step, value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}", epoch=epoch)
            if diverged:
                break
            metrics = evaluate()
            _check_primary(task, metrics, primary)
            record = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "metrics": metrics, "step": step}
            history.append(record)
            _call(cbs, "on_eval", epoch, metrics)
            _call(cbs, "on_epoch_end", epoch, record)
            if metrics[primary] > best_value:
                best_value, best_epoch, best_metrics = metrics[primary], epoch, metrics
                best_state, stale = _snapshot(handle), 0
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
        "warmup_steps": warmup, "total_steps": cfg.epochs * steps_per_epoch,
        "trainable_params": n_train, "total_params": n_total, "trainable_ratio": n_train / max(n_total, 1),
        "primary_metric": primary, "history": history, "best_epoch": best_epoch, "best_metrics": best_metrics,
        "epochs_run": len(history) - 1, "stopped_early": stopped_early, "diverged": diverged, "steps": step,
        "seconds": seconds, "examples_per_second": seen / seconds if seconds > 0 else 0.0, "precision": precision,
        "train_examples": len(train), "valid_examples": len(valid),
    }
    return TuneResult(handle, best_state, report)


@dataclass
class SweepResult:
    best: TuneResult  # the chosen lr's run; its model holds that run's best epoch
    rows: list[dict]  # per lr, in grid order: lr, valid_score, best_epoch, epochs_run, diverged, seconds
    grid: tuple[float, ...]

    @property
    def lr(self) -> float:
        return float(self.best.report["lr"])


def sweep_lr(load_model: Callable[[], torch.nn.Module], tokenizer, task, train_examples: list,
             valid_examples: list, method: str, cfg: TuneConfig | None = None, callbacks_for=None,
             progress: bool = True, grid: tuple[float, ...] | None = None) -> SweepResult:
    """Tune `method` once per lr of its grid (cfg.lr_grid_for), each from a fresh base (`load_model()`), and keep
    the run with the best valid primary metric (the first of equals in grid order). Epoch 0 is scored once and
    shared: every lr starts from the same seeded delta. `callbacks_for(lr)` gives the callbacks of one lr's run."""
    cfg = cfg or TuneConfig()
    grid = tuple(float(x) for x in (grid or cfg.lr_grid_for(method)))
    best: TuneResult | None = None
    rows: list[dict] = []
    start = None
    for lr in grid:
        run_cfg = cfg.model_copy(update={"lr": {**cfg.lr, method: lr}})
        res = tune(load_model(), tokenizer, task, train_examples, valid_examples, method, run_cfg,
                   callbacks=callbacks_for(lr) if callbacks_for else None, progress=progress, start_metrics=start)
        rep = res.report
        start = rep["history"][0]["metrics"]
        score = float(rep["best_metrics"][rep["primary_metric"]])
        rows.append({"lr": lr, "metric": rep["primary_metric"], "valid_score": score,
                     "best_epoch": rep["best_epoch"], "epochs_run": rep["epochs_run"], "diverged": rep["diverged"],
                     "seconds": round(rep["seconds"], 2)})
        if best is None or score > best.report["best_metrics"][rep["primary_metric"]]:
            best = res
        else:
            del res
    assert best is not None  # the grid is never empty (TuneConfig checks it)
    best.report["lr_grid"] = list(grid)
    best.report["lr_sweep"] = rows
    return SweepResult(best, rows, grid)
