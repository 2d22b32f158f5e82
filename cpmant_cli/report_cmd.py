"""`cpmant report` (the lifecycle report as one HTML page) and `cpmant rerun` (replay a recorded run into a fresh
home and compare its metrics)."""

from __future__ import annotations

import json
import warnings

from .common import nonempty, run_flow


def cmd_report(args) -> int:
    from cpmant.fsutil import check_writable
    from flows.report import report_flow

    if args.out:
        check_writable(args.out, "--out")  # before the report is built, not after
    out = run_flow(report_flow, None, args.out)
    missing = [k for k, v in out["sections"].items() if not v]
    if args.json:
        print(json.dumps({k: out[k] for k in ("path", "run_id", "sections")}, indent=2))
        return 0
    print(f"report: {out['path']}")
    print(f"logged in MLflow run {out['run_id']} (artifact report/{out['path'].rsplit('/', 1)[-1]}) and as the "
          "Prefect markdown artifact lifecycle-report")
    if missing:
        print(f"not run yet: {', '.join(missing)}")
    return 0


def format_rerun(res: dict) -> str:
    lines = []
    for r in res["stages"]:
        verdict = "equal" if not r["differences"] else f"{len(r['differences'])} DIFFER"
        lines.append(f"{r['stage']:<9} recorded {r['recorded_run']}  rerun {r['new_run']}  {r['model']}  "
                     f"{len(r['compared'])} metrics {verdict} (timing left out: {len(r['skipped'])})")
        lines.append(f"          config from {r['config_source']}"
                     + (f"; not recorded: {'; '.join(r['missing'])}" if r["missing"] else ""))
        lines += [f"          {d}" for d in r["differences"][:20]]
    lines.append(f"store of the rerun: {res['home']}")
    lines.append("every reproducible metric equal to the last digit" if res["equal"]
                 else "the rerun differs from the recorded run")
    return "\n".join(lines)


def cmd_rerun(args) -> int:
    from .rerun import rerun

    with warnings.catch_warnings():  # the code-version warning: printed below as one `warning:` line
        warnings.filterwarnings("ignore", message="the run ", category=UserWarning)
        res = run_flow(rerun, args.run, args.home, strict=args.strict)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        if res["code_warning"]:
            print(f"warning: {res['code_warning']}")
        print(format_rerun(res))
    return 0 if res["equal"] else 1


def add_verbs(sub) -> None:
    p = sub.add_parser("report", help="write the lifecycle report: one self-contained HTML page (also logged to "
                                      "MLflow and Prefect)")
    p.add_argument("--out", type=nonempty, default=None,
                   help="the HTML file (default: $CPMANT_HOME/reports/report.html)")
    p.add_argument("--json", action="store_true", help="print the path, run id and sections as JSON")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("rerun", help="replay a recorded run (and the runs that made its parent) into a fresh home "
                                     "and compare every metric")
    p.add_argument("run", metavar="RUN_ID", help="a run id of the current tracking store, or a model URI "
                                                 "(models:/NAME/VERSION, models:/NAME@ALIAS)")
    p.add_argument("--home", required=True, type=nonempty,
                   help="a new or empty folder: the rerun's CPMANT_HOME, with its own MLflow store")
    p.add_argument("--strict", action="store_true",
                   help="refuse when the code version differs from the recorded one (default: warn)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(fn=cmd_rerun)
