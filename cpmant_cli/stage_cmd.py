"""`cpmant lifecycle`, `cpmant pretrain` and `cpmant compress`: the build stages' verbs, each run through
`common.run_stage_verb` (config once, early checks, task runner, flow, summary)."""

from __future__ import annotations

from .common import (add_config_args, add_outcome_args, add_runner_args, backend_choices, check_pretraining,
                     config_overrides, force_of, int_at_least, nonempty, preset_names, recipe_names,
                     run_stage_verb, stage_overrides)


def _pretraining_checks(args, stage_of=None):
    """The early checks of a verb that pretrains (check_pretraining), and what Ctrl+C prints: the run folder the
    checkpoints are kept in; `stage_of`: the lifecycle's running stage (Ctrl+C in tune is no pretraining hint)."""

    def checks(cfg):
        from tasks.pretrain import run_folder

        check_pretraining(args, cfg)
        args.interrupt_hint = lambda: run_folder(cfg.pretrain)
        if stage_of is not None:
            args.interrupt_stage = stage_of

    return checks


def cmd_pretrain(args) -> int:
    from flows.pretrain import pretrain_flow

    force = "pretrain" in force_of(args)
    run_stage_verb(args, pretrain_flow, lambda flow, config: flow(config, force=force), stage_overrides(args),
                   checks=_pretraining_checks(args))
    return 0


def cmd_lifecycle(args) -> int:
    from flows.lifecycle import lifecycle_flow, running_stage

    force = sorted(force_of(args))  # an unknown stage is an error before anything runs (a list: a flow parameter)
    # the lifecycle's own tasks are bookkeeping; each stage subflow runs on the configured task runner
    run_stage_verb(args, lifecycle_flow, lambda flow, config: flow(config, force=force), stage_overrides(args),
                   checks=_pretraining_checks(args, running_stage), runner=False)
    return 0


def cmd_compress(args) -> int:
    from flows.compress import compress_flow

    force = "compress" in force_of(args)

    def checks(cfg):
        from cpmant.backends import get_backend
        from cpmant.compress.recipe import get_recipes
        from registry.pulling import require_full_weights

        get_backend("compress", cfg.compress.backend)  # fail before any flow starts
        get_recipes(args.recipe or cfg.compress.recipes)  # an unknown recipe too
        require_full_weights(args.uri, "compress")  # a delta is merged first (pull --merge), refused before the flow

    run_stage_verb(args, compress_flow, lambda flow, config: flow(args.uri, args.recipe, config, force=force),
                   config_overrides(args, "compress", backend=args.backend), checks=checks)
    return 0


def _add_run_args(p, force_stages: bool = False) -> None:
    p.add_argument("--preset", type=nonempty, help=f"model preset: {preset_names()}")
    p.add_argument("--corpus", type=nonempty, help="folder of .txt/.jsonl files (default: Debian fortunes-zh)")
    p.add_argument("--config", type=nonempty, help="YAML file (a saved LifecycleConfig; see configs/)")
    p.add_argument("--max-steps", type=int_at_least(1), help="optimizer steps (1 or more)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. pretrain.lr=0.05 tracking.country_iso_code=FRA")
    add_outcome_args(p, force_stages)


def add_verbs(sub) -> None:
    p = sub.add_parser("lifecycle", help="run every stage on the embedded default: pretrain, compress, tune, "
                       "validate (promote what passes), report")
    _add_run_args(p, force_stages=True)
    add_runner_args(p)
    p.set_defaults(fn=cmd_lifecycle)

    p = sub.add_parser("pretrain", help="pretrain a preset on a corpus and register cpm-ant-<preset>")
    _add_run_args(p)
    p.add_argument("--resume", type=nonempty,
                   help="auto (continue the latest complete checkpoint; the default), never, or a step folder")
    p.add_argument("--nproc", type=int_at_least(1), help="processes through torchrun (gloo on CPU)")
    p.add_argument("--backend", choices=backend_choices("train"), help="training backend")
    add_runner_args(p)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("compress", help="compress a registered model into size variants (the published ladder)")
    p.add_argument("uri", help="the parent: models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--recipe", type=nonempty, default=None,
                   help=f"{recipe_names()} (all = the ladder rungs), a comma list, or recipe YAML files; "
                        "default: the config's compress.recipes")
    add_config_args(p, "compress", "compress.importance_rows=32")
    p.add_argument("--backend", choices=backend_choices("compress"), help="compression backend")
    add_outcome_args(p)
    add_runner_args(p)
    p.set_defaults(fn=cmd_compress)
