"""`cpmant`: one console script over the flows and the registry. `cpmant VERB --help` describes each verb.

The CLI reaches the core directly in a few places only:
- the choices it offers: presets (cpmant.config.PRESETS), recipes (cpmant.compress.recipe), backends
  (cpmant.backends), generation defaults and checks (cpmant.generate.GenerationConfig); a backend that cannot run
  here and an unknown recipe are reported before any flow starts;
- config parsing (cpmant.configio: YAML file plus `--set` overrides);
- `convert` (cpmant.convert) and `generate` (cpmant.checkpoint.load_pretrained, cpmant.generate), which run no flow
  and record nothing.

This module holds the parser, the registry verbs and what happens around every verb (warnings, housekeeping, errors,
Ctrl+C). The steps the verbs share are in common.py; the other verbs in *_cmd.py modules, which never import this
one.
"""

from __future__ import annotations

import json
import sys
import warnings

from cpmant.errors import CpmantError

from .common import EXIT_INTERRUPTED, EXIT_USAGE, Parser, UsageError, nonempty
from .env import configure_environment


def _verb_modules() -> list:
    """Modules with `add_verbs(sub)`, in the order `cpmant --help` lists them after the build stages and the registry
    verbs: generate, tune, validate/promote, report/rerun."""
    from . import generate_cmd, report_cmd, tune_cmd, validate_cmd

    return [generate_cmd, tune_cmd, validate_cmd, report_cmd]


# ---- the registry verbs (no flow: one registry or core call each) ---------------------------------------------
def cmd_convert(args) -> int:
    from cpmant.convert import convert

    out = convert(args.src, args.dst, args.to)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def cmd_register(args) -> int:
    from registry.register import register_folder

    reg, new = register_folder(args.dir, args.name, stage=args.stage, parent=args.parent or "",
                               alias=args.alias or None)
    if not new:
        print(f"already registered as {reg} (same checkpoint sha256): nothing registered")
        return 0
    print(f"registered {reg.uri}" + (f" (alias {reg.alias})" if reg.alias else ""))
    return 0


def cmd_pull(args) -> int:
    from registry.pulling import download

    out = download(args.uri, args.to, merge=args.merge)
    how = ("a plain checkpoint; a LoRA delta is merged into its base's weights" if args.merge else
           "every file verified against its sha256 tag")
    print(f"pulled {args.uri} into {out} ({how})")
    return 0


def cmd_lineage(args) -> int:
    from registry.ancestry import format_lineage, lineage

    chain = lineage(args.uri)
    print(json.dumps(chain, indent=2) if args.json else format_lineage(chain))
    return 0


def cmd_serve(args) -> int:
    """MLflow's scoring server on the version, verified first (registry.serve checks the URI, host, port, workers)."""
    from registry.serve import serve

    print(serve(args.uri, host=args.host, port=args.port, workers=args.workers))
    return 0


# ---- the parser: the build stages (stage_cmd.py), the verbs above, then those kept in modules of their own -------
def build_parser() -> Parser:
    from . import stage_cmd

    ap = Parser(prog="cpmant", description="The whole life of a CPM-Ant model: Prefect flows, MLflow tracking "
                "and registry. State lives under CPMANT_HOME (default ./.cpmant).")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")
    stage_cmd.add_verbs(sub)  # lifecycle, pretrain, compress

    p = sub.add_parser("pull", help="download a version's checkpoint, verifying every file's sha256")
    p.add_argument("uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--to", required=True, type=nonempty, help="a new or empty folder")
    p.add_argument("--merge", action="store_true",
                   help="for a LoRA delta: a plain checkpoint with the delta merged into its base's weights (same "
                        "logits; loads without the base)")
    p.set_defaults(fn=cmd_pull)

    p = sub.add_parser("serve", help="serve a version over HTTP (MLflow's /invocations protocol) on 127.0.0.1")
    p.add_argument("uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network (printed as a warning)")
    p.add_argument("--port", type=int, default=5001, help="1-65535")
    p.add_argument("--workers", type=int, default=1, help="1 or more")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("lineage", help="a version's chain back through its parents to the corpus and code")
    p.add_argument("uri")
    p.add_argument("--json", action="store_true", help="print the chain as JSON")
    p.set_defaults(fn=cmd_lineage)

    p = sub.add_parser("convert", help="convert between cpmant, transformers (hf) and CPM-Live checkpoints")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=["cpmant", "hf", "cpm-live"])
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("register", help="register a checkpoint folder as a new model version")
    p.add_argument("dir")
    p.add_argument("--name", required=True)
    p.add_argument("--stage", default=None, choices=["pretrain", "compress", "delta"],
                   help="only for a folder whose metadata records none (the checkpoint's own metadata decides)")
    p.add_argument("--parent", default="", help="the parent's models:/NAME/VERSION, only where the folder records "
                   "none (a delta's delta_config.json and a variant's metadata name theirs)")
    p.add_argument("--alias", default="candidate", help="alias to set ('' for none; never champion: "
                   "`cpmant promote` moves it)")
    p.set_defaults(fn=cmd_register)

    for module in _verb_modules():  # the verbs kept in modules of their own, each with add_verbs(sub)
        module.add_verbs(sub)
    return ap


def interrupt_lines(stage: str | None, where, has_hint: bool) -> list[str]:
    """What Ctrl+C prints: the stage that was running (a lifecycle's; None for a verb of one stage) and how to go on.
    Only pretraining continues mid-way (from `where`/checkpoints); a later lifecycle stage starts over, and the
    stages finished before it are reused."""
    during = f" during the {stage} stage" if stage else ""
    lines = [f"interrupted: stopped by Ctrl+C{during}"]
    if stage not in (None, "pretrain"):
        lines.append(f"fix: run the same command again: the stages finished before {stage} are reused and {stage} "
                     "starts over (only pretraining continues mid-way, from its last checkpoint)")
    elif has_hint:
        kept = f"the checkpoints written so far are kept in {where}/checkpoints; " if where else ""
        lines.append(f"fix: {kept}run the same command again to continue from the last one (--resume auto, the "
                     "default)")
    return lines


def _call_quietly(fn):
    """fn() or None: the interrupt message must not fail."""
    try:
        return fn() if fn is not None else None
    except Exception:
        return None


def _interrupted(args) -> int:
    hint = getattr(args, "interrupt_hint", None)
    stage = _call_quietly(getattr(args, "interrupt_stage", None))
    print("", file=sys.stderr)
    for line in interrupt_lines(stage, _call_quietly(hint), hint is not None):
        print(line, file=sys.stderr)
    return EXIT_INTERRUPTED


def _plain_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one `warning: ...` line, as the CLI's errors are printed (not Python's `path:line: UserWarning:`
    and the source line)."""
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


def plain_warnings() -> None:
    """Print every warning of this process as one plain line (the console script's only; a library user keeps
    Python's format)."""
    warnings.showwarning = _plain_warning


def _housekeeping() -> None:
    """Tag this command's runs with its process; mark runs a killed command left RUNNING as KILLED and stop the
    temporary Prefect server it left running (one line each)."""
    from .stale_runs import mark_killed_runs, tag_runs_with_this_process
    from .stale_servers import stop_orphaned_servers

    tag_runs_with_this_process()
    for step, what in ((mark_killed_runs, "runs left RUNNING"), (stop_orphaned_servers, "temporary Prefect servers")):
        try:
            step()
        except Exception as e:  # bookkeeping of an earlier command must never stop this one
            print(f"warning: could not check for {what} by a killed command ({type(e).__name__}: {e})",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    plain_warnings()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"fix: see `{e.prog} --help` for the accepted values", file=sys.stderr)
        return EXIT_USAGE
    try:
        configure_environment()
        _housekeeping()
        return args.fn(args)
    except CpmantError as e:
        print(f"error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"fix: {e.fix}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return _interrupted(args)


if __name__ == "__main__":
    sys.exit(main())
