"""`cpmant validate` (the validate flow: measure, gate, promote) and `cpmant promote` (move `champion` by hand,
recorded with who asked and why)."""

from __future__ import annotations

import sys
import time

EXIT_FAILED_GATES = 1  # `cpmant validate` ran, and at least one version failed a gate


def cmd_validate(args) -> int:
    from cpmant.configio import build_config, parse_overrides
    from flows.config import LifecycleConfig
    from flows.validate import validate_flow
    from registry.pulling import resolve_version
    from registry.tracking import setup_tracking

    from cpmant.configio import deep_merge
    from flows.runners import with_runner

    from .main import _report, _run_flow, runner_overrides

    t0 = time.perf_counter()
    cfg = build_config(LifecycleConfig, args.config,  # bad settings fail first
                       deep_merge(parse_overrides(args.set), runner_overrides(args)))
    setup_tracking(cfg.tracking.experiment)
    for uri in args.uri:  # an unknown model or version fails before any flow starts
        resolve_version(uri)
    promote = False if args.no_promote else None
    config = cfg.model_dump(mode="json")
    out = _run_flow(with_runner(validate_flow, config), list(args.uri), config, force=args.force, promote=promote)
    _report(out, args, t0)
    if not args.json:
        for r in out["results"]:
            for f in r["failures"]:
                print(f"  {r['model']} failed gate: {f}")
            print(f"  {r['model']}: report in MLflow run {r['run_id']} (validation_report.md)")
    return EXIT_FAILED_GATES if any(not r["passed"] for r in out["results"]) else 0


def cmd_promote(args) -> int:
    from registry.promotion import promote_by_hand

    rec = promote_by_hand(args.uri, args.reason)
    prev = rec["previous"] or "none"
    print(f"champion: {prev} -> {rec['model']} (by {rec['by']}: {rec['reason']}; MLflow run {rec['run_id']})",
          file=sys.stdout)
    return 0


def add_verbs(sub) -> None:
    from .main import _add_outcome_args, _nonempty, add_runner_args

    p = sub.add_parser("validate", help="measure versions (perplexity, smoke generations, speed, latency, memory, a "
                                        "delta's task) and move `champion` where every gate passes")
    p.add_argument("uri", nargs="+", help="models:/NAME/VERSION or models:/NAME@ALIAS (one or more)")
    p.add_argument("--no-promote", action="store_true",
                   help="measure and decide the gates, but leave `champion` where it is")
    p.add_argument("--config", type=_nonempty,
                   help="YAML file (a saved LifecycleConfig; its validation section applies)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. validation.task_examples=32 validation.gates.perplexity.threshold=500")
    _add_outcome_args(p)
    add_runner_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("promote", help="make a version `champion` by hand, recording who asked and why")
    p.add_argument("uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--reason", required=True, type=_nonempty, help="why this version becomes champion (recorded)")
    p.set_defaults(fn=cmd_promote)
