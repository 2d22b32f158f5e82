"""`cpmant validate` (the validate flow: measure, gate, promote) and `cpmant promote` (move `champion` by hand,
recorded with who asked and why)."""

from __future__ import annotations

import sys

from .common import (add_config_args, add_outcome_args, add_runner_args, config_overrides, force_of, nonempty,
                     run_stage_verb)

EXIT_FAILED_GATES = 1  # `cpmant validate` ran, and at least one version failed a gate


def cmd_validate(args) -> int:
    from flows.validate import validate_flow

    force = "validate" in force_of(args)
    promote = False if args.no_promote else None

    def checks(cfg):  # an unknown model or version fails before any flow starts
        from registry.pulling import resolve_version
        from registry.tracking import setup_tracking

        setup_tracking(cfg.tracking.experiment)
        for uri in args.uri:
            resolve_version(uri)

    out = run_stage_verb(args, validate_flow,
                         lambda flow, config: flow(list(args.uri), config, force=force, promote=promote),
                         config_overrides(args), checks=checks)
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
    p = sub.add_parser("validate", help="measure versions (perplexity, smoke generations, speed, latency, memory, a "
                                        "delta's task) and move `champion` where every gate passes")
    p.add_argument("uri", nargs="+", help="models:/NAME/VERSION or models:/NAME@ALIAS (one or more)")
    p.add_argument("--no-promote", action="store_true",
                   help="measure and decide the gates, but leave `champion` where it is")
    add_config_args(p, "validation",
                    "validation.task_examples=32 validation.gates.perplexity.threshold=500")
    add_outcome_args(p)
    add_runner_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("promote", help="make a version `champion` by hand, recording who asked and why")
    p.add_argument("uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--reason", required=True, type=nonempty, help="why this version becomes champion (recorded)")
    p.set_defaults(fn=cmd_promote)
