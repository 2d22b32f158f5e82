"""`cpmant`: one console script over the flows and the registry. `cpmant VERB --help` describes each verb.

The CLI reaches the core directly in a few places only:
- the choices it offers: presets (cpmant.config.PRESETS), recipes (cpmant.compress.recipe), backends
  (cpmant.backends), generation defaults and checks (cpmant.generate.GenerationConfig); a backend that cannot run
  here and an unknown recipe are reported before any flow starts;
- config parsing (cpmant.configio: YAML file plus `--set` overrides);
- `convert` (cpmant.convert) and `generate` (cpmant.checkpoint.load_pretrained, cpmant.generate), which run no flow
  and record nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from cpmant.errors import CpmantError

from .env import check_prefect_api, configure_environment, isolate_prefect_server, quiet_prefect_console


def _verb_modules() -> list:
    """Modules with `add_verbs(sub)`: generate, tune, validate/promote, report/rerun."""
    from . import generate_cmd, report_cmd, tune_cmd, validate_cmd

    return [generate_cmd, tune_cmd, validate_cmd, report_cmd]

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _UsageError(Exception):
    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag like every other bad input: one `error:` and one `fix:` line, exit 2."""

    def error(self, message: str):  # noqa: D102
        raise _UsageError(message, self.prog)


# ---- argument types: bad values are errors here, not silently replaced by defaults ---------------------------
def _int_at_least(low: int):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is below the least allowed value {low}")
        return v

    conv.__name__ = f"integer >= {low}"
    return conv


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value is not allowed")
    return text


_nonempty.__name__ = "non-empty value"


def _preset_names() -> str:
    from cpmant.config import PRESETS

    return ", ".join(PRESETS)


def _recipe_names() -> str:
    from cpmant.compress.recipe import recipe_names

    return ", ".join(recipe_names())


def _backend_names(stage: str) -> tuple[str, ...]:
    from cpmant.backends import backend_names

    return backend_names(stage)


# ---- config ------------------------------------------------------------------------------------------------
def runner_overrides(args) -> dict:
    """`--task-runner` / `--dask-address` as config overrides of the `orchestration` section (verbs in other
    modules call it after `add_runner_args`)."""
    o = {}
    if getattr(args, "task_runner", None):
        o["task_runner"] = args.task_runner
    if getattr(args, "dask_address", None):
        from flows.runners import check_dask_address

        check_dask_address(args.dask_address)  # a few seconds at most, before any flow starts
        o["dask_address"] = args.dask_address
        o.setdefault("task_runner", "dask")
    return {"orchestration": o} if o else {}


def _stage_overrides(args, section: str = "pretrain") -> dict:
    from cpmant.configio import deep_merge, parse_overrides

    p = {k: getattr(args, k) for k in ("preset", "corpus", "max_steps", "resume", "nproc", "backend")
         if getattr(args, k, None) is not None}
    return deep_merge(deep_merge(parse_overrides(args.set), {section: p} if p else {}), runner_overrides(args))


def check_resume(value: str, flag: str = "--resume") -> None:
    """`resume` is auto, never, or an existing checkpoint folder: checked here, before any flow, because a reused
    pretraining result never reads it (a typo would otherwise pass silently)."""
    from cpmant import checkpoint as ckpt

    if value in ("auto", "never"):
        return
    path = Path(value).expanduser()
    fix = (f"use {flag} auto (continue the newest intact checkpoint), {flag} never (start over), or {flag} "
           "with an existing step folder (runs/.../checkpoints/step-N)")
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise CpmantError(f"{flag} {value!r} is neither auto, never nor a checkpoint folder: {path} {what}", fix)
    try:
        ckpt.read_meta(path)
    except (CpmantError, ValueError, OSError) as e:
        why = str(getattr(e, "problem", e)).splitlines()[0]
        raise CpmantError(f"{flag} {value!r} is not a checkpoint folder ({why})", fix) from None


def _load_lifecycle(args) -> dict:
    from cpmant.backends import get_backend
    from cpmant.configio import build_config
    from flows.config import LifecycleConfig

    cfg = build_config(LifecycleConfig, args.config, _stage_overrides(args))
    check_resume(cfg.pretrain.resume, "--resume" if getattr(args, "resume", None) else "pretrain.resume")
    get_backend("train", cfg.pretrain.backend)  # a backend that cannot run here fails before any flow starts
    return cfg.model_dump(mode="json")


# ---- what a user sees after a run ----------------------------------------------------------------------------
def format_summary(rows: list[dict]) -> str:
    """stage | model | key metric | time | reused, one line per model made or reused."""
    head = ("stage", "model", "key metric", "time", "reused")
    lines = []
    for r in rows:
        v = r.get("value")
        metric = f"{r['metric']} {v:.4g}" if isinstance(v, (int, float)) else f"{r['metric']} -"
        if r.get("note"):
            metric += f" ({r['note']})"
        lines.append((r["stage"], str(r["model"]), metric, f"{r['seconds']:.1f} s", "yes" if r["reused"] else "no"))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*x).rstrip() for x in [head, tuple("-" * w for w in widths), *lines])


def _report(out: dict, args, started: float) -> int:
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
        return 0
    print(format_summary(out["summary"]))
    stages = out.get("reused_stages")
    if stages is not None:  # the lifecycle: which stages were reused
        tail = (f"; reused: {', '.join(stages)} (--force STAGE reruns one, --force all)" if stages
                else "; no stage was reused")
    else:
        reused = all(r["reused"] for r in out["summary"])
        tail = "; every result was reused (--force reruns)" if reused else ""
    print(f"done in {time.perf_counter() - started:.1f} s{tail}")
    return 0


def _run_flow(fn, *a, **kw):
    """Run a flow with Prefect reachable, interruptible and quiet about errors the CLI prints itself."""
    check_prefect_api()
    from .prefect_db import init_prefect_database

    init_prefect_database()  # a fresh home: migrated here, one command at a time, not by two servers at once
    isolate_prefect_server()
    quiet_prefect_console()
    return fn(*a, **kw)


# ---- verbs --------------------------------------------------------------------------------------------------
def cmd_pretrain(args) -> int:
    from flows.pretrain import pretrain_flow, pretrain_run_folder

    t0 = time.perf_counter()
    cfg = _load_lifecycle(args)
    args.interrupt_hint = lambda: pretrain_run_folder(cfg)
    from flows.runners import with_runner

    return _report(_run_flow(with_runner(pretrain_flow, cfg), cfg, force=args.force), args, t0)


def cmd_lifecycle(args) -> int:
    from flows.lifecycle import lifecycle_flow, running_stage
    from flows.pretrain import pretrain_run_folder

    t0 = time.perf_counter()
    from flows.config import check_force

    force = True if args.force == [] else (args.force or False)
    force = check_force(force)  # an unknown stage is an error before anything runs
    cfg = _load_lifecycle(args)
    args.interrupt_hint = lambda: pretrain_run_folder(cfg)
    args.interrupt_stage = running_stage  # Ctrl+C in tune is not the pretraining checkpoint hint
    # the lifecycle's own tasks are bookkeeping; each stage subflow runs on the configured task runner
    return _report(_run_flow(lifecycle_flow, cfg, force=list(force) if isinstance(force, tuple) else force),
                   args, t0)


def cmd_compress(args) -> int:
    from cpmant.backends import get_backend
    from cpmant.compress.recipe import get_recipes
    from cpmant.configio import build_config, parse_overrides
    from flows.compress import compress_flow
    from flows.config import LifecycleConfig
    from flows.runners import with_runner

    t0 = time.perf_counter()
    from cpmant.configio import deep_merge

    over = deep_merge(parse_overrides(args.set), runner_overrides(args))
    if args.backend is not None:
        over.setdefault("compress", {})["backend"] = args.backend
    cfg = build_config(LifecycleConfig, args.config, over)
    get_backend("compress", cfg.compress.backend)  # fail before any flow starts
    get_recipes(args.recipe or cfg.compress.recipes)  # an unknown recipe too
    from registry.pulling import require_full_weights

    require_full_weights(args.uri, "compress")  # a delta is merged first (pull --merge), refused before the flow
    dumped = cfg.model_dump(mode="json")
    out = _run_flow(with_runner(compress_flow, dumped), args.uri, args.recipe, dumped, force=args.force)
    return _report(out, args, t0)


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


# ---- the parser: the verbs above, then those kept in modules of their own -------------------------------------
def add_runner_args(p: argparse.ArgumentParser) -> None:
    """--task-runner and --dask-address (for the stage verbs and lifecycle; read back with runner_overrides)."""
    p.add_argument("--task-runner", choices=["thread", "dask"], default=None,
                   help="how tasks run: thread (Prefect's thread pool, the default) or dask (prefect-dask: a local "
                        "cluster of 2 worker processes, or --dask-address)")
    p.add_argument("--dask-address", type=_dask_address, default=None, metavar="tcp://HOST:PORT",
                   help="an existing Dask scheduler (implies --task-runner dask)")


def _dask_address(text: str) -> str:
    if not text.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Dask scheduler address (tcp://HOST:PORT)")
    return text


_dask_address.__name__ = "Dask scheduler address"


def _add_run_args(p: argparse.ArgumentParser, force_stages: bool = False) -> None:
    p.add_argument("--preset", type=_nonempty, help=f"model preset: {_preset_names()}")
    p.add_argument("--corpus", type=_nonempty, help="folder of .txt/.jsonl files (default: Debian fortunes-zh)")
    p.add_argument("--config", type=_nonempty, help="YAML file (a saved LifecycleConfig; see configs/)")
    p.add_argument("--max-steps", type=_int_at_least(1), help="optimizer steps (1 or more)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. pretrain.lr=0.05 tracking.country_iso_code=FRA")
    _add_outcome_args(p, force_stages)


def _add_outcome_args(p: argparse.ArgumentParser, force_stages: bool = False) -> None:
    if force_stages:
        from flows.config import STAGES

        p.add_argument("--force", nargs="*", choices=STAGES, default=None, metavar="STAGE",
                       help="rerun every stage even when identical results exist; with stage names "
                            f"({', '.join(STAGES)}) rerun only those")
    else:
        p.add_argument("--force", action="store_true",
                       help="run again even when a version made from the same inputs exists (default: reuse it)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="cpmant", description="The whole life of a CPM-Ant model: Prefect flows, MLflow tracking "
                 "and registry. State lives under CPMANT_HOME (default ./.cpmant).")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("lifecycle", help="run every stage on the embedded default: pretrain, compress, tune, "
                       "validate (promote what passes), report")
    _add_run_args(p, force_stages=True)
    add_runner_args(p)
    p.set_defaults(fn=cmd_lifecycle)

    p = sub.add_parser("pretrain", help="pretrain a preset on a corpus and register cpm-ant-<preset>")
    _add_run_args(p)
    p.add_argument("--resume", type=_nonempty,
                   help="auto (continue the latest complete checkpoint; the default), never, or a step folder")
    p.add_argument("--nproc", type=_int_at_least(1), help="processes through torchrun (gloo on CPU)")
    p.add_argument("--backend", choices=_backend_names("train"), help="training backend")
    add_runner_args(p)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("compress", help="compress a registered model into size variants (the published ladder)")
    p.add_argument("uri", help="the parent: models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--recipe", type=_nonempty, default=None,
                   help=f"{_recipe_names()} (all = the ladder rungs), a comma list, or recipe YAML files; "
                        "default: the config's compress.recipes")
    p.add_argument("--config", type=_nonempty, help="YAML file (a saved LifecycleConfig; its compress section applies)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. compress.importance_rows=32")
    p.add_argument("--backend", choices=_backend_names("compress"), help="compression backend")
    _add_outcome_args(p)
    add_runner_args(p)
    p.set_defaults(fn=cmd_compress)


    p = sub.add_parser("pull", help="download a version's checkpoint, verifying every file's sha256")
    p.add_argument("uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--to", required=True, type=_nonempty, help="a new or empty folder")
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
    except _UsageError as e:
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
