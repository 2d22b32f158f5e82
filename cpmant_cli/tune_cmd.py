"""`cpmant tune`: delta-tune a registered model on CUGE or demo tasks (the tune flow)."""

from __future__ import annotations

import time


def cmd_tune(args) -> int:
    from cpmant.configio import build_config, parse_overrides
    from flows.config import LifecycleConfig
    from flows.tune import resolve_methods, resolve_tasks, tune_flow
    from registry.pulling import resolve_version
    from registry.tracking import setup_tracking

    from cpmant.configio import deep_merge
    from flows.runners import with_runner

    from .main import _report, _run_flow, runner_overrides

    t0 = time.perf_counter()
    over = deep_merge(parse_overrides(args.set), runner_overrides(args))
    tune = over.setdefault("tune", {})
    for key in ("task", "method", "data"):
        if getattr(args, key, None) is not None:
            tune[{"task": "tasks", "method": "methods"}.get(key, key)] = getattr(args, key)
    if args.sweep_lr:
        tune["sweep_lr"] = True
    cfg = build_config(LifecycleConfig, args.config, over)
    resolve_tasks(cfg.tune.tasks)  # an unknown task or method fails here, before any flow starts
    resolve_methods(cfg.tune.methods)
    setup_tracking(cfg.tracking.experiment)  # and an unknown model or version
    resolve_version(args.uri)
    config = cfg.model_dump(mode="json")
    out = _run_flow(with_runner(tune_flow, config), args.uri, cfg.tune.tasks, cfg.tune.methods, config,
                    force=args.force)
    return _report(out, args, t0)


def add_verbs(sub) -> None:
    from .main import _add_outcome_args, _nonempty, add_runner_args

    p = sub.add_parser("tune", help="tune task deltas of a registered model (LoRA and others; CUGE or demo tasks) "
                                    "and register <model>-<task>-<method>")
    p.add_argument("uri", help="the base: models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--task", type=_nonempty, default=None,
                   help="task name or comma list: a CUGE task (ccpm, c3, sogou-log, lcsts, kdconv, math23k) or a demo "
                        "task (demo-ccpm, demo-c3, demo-lcsts, demo-math23k); an unknown name lists the known ones "
                        "(default: the config's tune.tasks)")
    p.add_argument("--method", type=_nonempty, default=None,
                   help="delta method or comma list, e.g. lora, bitfit, adapter, or full (full fine-tuning, the "
                        "baseline); an unknown name lists the known ones (default: the config's tune.methods)")
    p.add_argument("--data", type=_nonempty, default=None,
                   help="folder of a CUGE task's raw files (default: $CUGE_DATA/<task>; demo tasks need none)")
    p.add_argument("--sweep-lr", action="store_true",
                   help="choose each method's lr on the valid split from its grid (at most 3 values, one tuning run "
                        "each; tune.lr_grid.<method> sets one, e.g. --set 'tune.lr_grid.full=[1e-3,3e-3]'); "
                        "without it each method uses tune.lr.<method> or its default")
    p.add_argument("--config", type=_nonempty, help="YAML file (a saved LifecycleConfig; its tune section applies)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. tune.epochs=2")
    _add_outcome_args(p)
    add_runner_args(p)
    p.set_defaults(fn=cmd_tune)
