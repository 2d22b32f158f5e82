"""`cpmant tune`: delta-tune a registered model on CUGE or demo tasks (the tune flow)."""

from __future__ import annotations

from .common import (add_config_args, add_outcome_args, add_runner_args, config_overrides, force_of, nonempty,
                     run_stage_verb)


def cmd_tune(args) -> int:
    from flows.tune import tune_flow

    force = "tune" in force_of(args)
    # --task / --method land in the config's tune section: TuneConfig reads "a,b" as a list and checks each name
    over = config_overrides(args, "tune", tasks=args.task, methods=args.method, data=args.data,
                            sweep_lr=True if args.sweep_lr else None)

    def checks(cfg):  # an unknown model or version fails before any flow starts
        from registry.pulling import resolve_version
        from registry.tracking import setup_tracking

        setup_tracking(cfg.tracking.experiment)
        resolve_version(args.uri)

    run_stage_verb(args, tune_flow, lambda flow, config: flow(args.uri, config=config, force=force), over,
                   checks=checks)
    return 0


def add_verbs(sub) -> None:
    p = sub.add_parser("tune", help="tune task deltas of a registered model (LoRA and others; CUGE or demo tasks) "
                                    "and register <model>-<task>-<method>")
    p.add_argument("uri", help="the base: models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--task", type=nonempty, default=None,
                   help="task name or comma list: a CUGE task (ccpm, c3, sogou-log, lcsts, kdconv, math23k) or a demo "
                        "task (demo-ccpm, demo-c3, demo-lcsts, demo-math23k); an unknown name lists the known ones "
                        "(default: the config's tune.tasks)")
    p.add_argument("--method", type=nonempty, default=None,
                   help="delta method or comma list, e.g. lora, bitfit, adapter, or full (full fine-tuning, the "
                        "baseline); an unknown name lists the known ones (default: the config's tune.methods)")
    p.add_argument("--data", type=nonempty, default=None,
                   help="folder of a CUGE task's raw files (default: $CUGE_DATA/<task>; demo tasks need none)")
    p.add_argument("--sweep-lr", action="store_true",
                   help="choose each method's lr on the valid split from its grid (at most 3 values, one tuning run "
                        "each; tune.lr_grid.<method> sets one, e.g. --set 'tune.lr_grid.full=[1e-3,3e-3]'); "
                        "without it each method uses tune.lr.<method> or its default")
    add_config_args(p, "tune", "tune.epochs=2")
    add_outcome_args(p)
    add_runner_args(p)
    p.set_defaults(fn=cmd_tune)
