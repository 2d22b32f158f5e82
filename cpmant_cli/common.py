"""The steps the CLI's verbs share, in one place: the parser that reports bad flags as one `error:`/`fix:` pair,
argument types, the flags several verbs take, the config built and checked once (`--config`, `--set`, the verb's
flags), `--force` as a set of stage names, running a flow, and the summary printed after it.

`run_stage_verb` is how every stage verb (pretrain, compress, tune, validate, lifecycle) runs:

    config (LifecycleConfig, built once) -> the verb's early checks -> dump -> task runner -> run the flow -> summary

Verb modules import from here, never from main.py (main imports them: no cycle). The choices the CLI offers come
from the registries (presets, recipes, backends that are built), never from lists written here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

from cpmant.errors import CpmantError

from .env import check_prefect_api, isolate_prefect_server, quiet_prefect_console

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class UsageError(Exception):
    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag like every other bad input: one `error:` and one `fix:` line, exit 2."""

    def error(self, message: str):  # noqa: D102
        raise UsageError(message, self.prog)


# ---- argument types: bad values are errors here, not silently replaced by defaults ---------------------------
def int_at_least(low: int):
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


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value is not allowed")
    return text


nonempty.__name__ = "non-empty value"


def dask_address(text: str) -> str:
    if not text.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Dask scheduler address (tcp://HOST:PORT)")
    return text


dask_address.__name__ = "Dask scheduler address"


# ---- choices, from the registries ------------------------------------------------------------------------------
def preset_names() -> str:
    from cpmant.config import PRESETS

    return ", ".join(PRESETS)


def recipe_names() -> str:
    from cpmant.compress.recipe import recipe_names as names

    return ", ".join(names())


def backend_choices(stage: str) -> tuple[str, ...]:
    """The backends registered for `stage` (cpmant.backends registers only those that are built)."""
    from cpmant.backends import backend_names

    return backend_names(stage)


# ---- flags several verbs take ----------------------------------------------------------------------------------
def add_runner_args(p: argparse.ArgumentParser) -> None:
    """--task-runner and --dask-address (for the stage verbs and lifecycle; read back with runner_overrides)."""
    p.add_argument("--task-runner", choices=["thread", "dask"], default=None,
                   help="how tasks run: thread (Prefect's thread pool, the default) or dask (prefect-dask: a local "
                        "cluster of 2 worker processes, or --dask-address)")
    p.add_argument("--dask-address", type=dask_address, default=None, metavar="tcp://HOST:PORT",
                   help="an existing Dask scheduler (implies --task-runner dask)")


def add_config_args(p: argparse.ArgumentParser, section: str, example: str) -> None:
    """--config (a saved LifecycleConfig) and --set (dotted overrides)."""
    p.add_argument("--config", type=nonempty, help=f"YAML file (a saved LifecycleConfig; its {section} section applies)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"dotted overrides, e.g. {example}")


def add_outcome_args(p: argparse.ArgumentParser, force_stages: bool = False) -> None:
    """--force (a stage verb: rerun; the lifecycle: rerun all, or the stages named) and --json."""
    if force_stages:
        from flows.config import STAGES

        p.add_argument("--force", nargs="*", choices=STAGES, default=None, metavar="STAGE",
                       help="rerun every stage even when identical results exist; with stage names "
                            f"({', '.join(STAGES)}) rerun only those")
    else:
        p.add_argument("--force", action="store_true",
                       help="run again even when a version made from the same inputs exists (default: reuse it)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of the summary")


# ---- values made once at the edge ------------------------------------------------------------------------------
def runner_overrides(args) -> dict:
    """`--task-runner` / `--dask-address` as config overrides of the `orchestration` section (the scheduler is
    asked first: a few seconds at most, before any flow starts)."""
    o = {}
    if getattr(args, "task_runner", None):
        o["task_runner"] = args.task_runner
    if getattr(args, "dask_address", None):
        from flows.runners import check_dask_address

        check_dask_address(args.dask_address)
        o["dask_address"] = args.dask_address
        o.setdefault("task_runner", "dask")
    return {"orchestration": o} if o else {}


def config_overrides(args, section: str | None = None, **flags) -> dict:
    """The overrides of a verb's config: `--set`, then the verb's own flags given (not None) under `section`, then
    the task-runner flags."""
    from cpmant.configio import deep_merge, parse_overrides

    given = {k: v for k, v in flags.items() if v is not None}
    over = deep_merge(parse_overrides(args.set), {section: given} if section and given else {})
    return deep_merge(over, runner_overrides(args))


PRETRAIN_FLAGS = ("preset", "corpus", "max_steps", "resume", "nproc", "backend")


def stage_overrides(args) -> dict:
    """The pretrain/lifecycle verbs' overrides: their pretraining flags under `pretrain`."""
    return config_overrides(args, "pretrain", **{k: getattr(args, k, None) for k in PRETRAIN_FLAGS})


def force_of(args) -> frozenset[str]:
    """`--force` as the stages to rerun, made once here: a stage verb's flag (every stage), the lifecycle's
    `--force` alone (every stage) or its stage names; none given = no stage."""
    from flows.config import check_force

    f = getattr(args, "force", None)
    return check_force(True if f == [] else (f or False))


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


def check_pretraining(args, cfg) -> None:
    """The pretrain section's early checks (pretrain and lifecycle): its resume value and a backend that can run
    here, before any flow starts."""
    from cpmant.backends import get_backend

    check_resume(cfg.pretrain.resume, "--resume" if getattr(args, "resume", None) else "pretrain.resume")
    get_backend("train", cfg.pretrain.backend)


# ---- running a flow and printing what it did -------------------------------------------------------------------
def run_flow(fn, *a, **kw):
    """Run a flow with Prefect reachable, interruptible and quiet about errors the CLI prints itself."""
    check_prefect_api()
    from .prefect_db import init_prefect_database

    init_prefect_database()  # a fresh home: migrated here, one command at a time, not by two servers at once
    isolate_prefect_server()
    quiet_prefect_console()
    return fn(*a, **kw)


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


def report(out: dict, args, started: float) -> None:
    """The flow's result: JSON with --json, else the summary table and the time it took."""
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
        return
    print(format_summary(out["summary"]))
    stages = out.get("reused_stages")
    if stages is not None:  # the lifecycle: which stages were reused
        tail = (f"; reused: {', '.join(stages)} (--force STAGE reruns one, --force all)" if stages
                else "; no stage was reused")
    else:
        reused = all(r["reused"] for r in out["summary"])
        tail = "; every result was reused (--force reruns)" if reused else ""
    print(f"done in {time.perf_counter() - started:.1f} s{tail}")


def run_stage_verb(args, flow, call: Callable, overrides: dict, *, checks: Callable | None = None,
                   runner: bool = True) -> dict:
    """Run one stage verb: build the LifecycleConfig once (`--config` under `overrides`; a bad value is one
    CpmantError), run the verb's early `checks(cfg)` (unknown models, backends that cannot run here...), dump the
    config, put the flow on the configured task runner (`runner`), run `call(flow, config)` (the verb's flow call)
    and print the summary. Returns the flow's result."""
    from cpmant.configio import build_config
    from flows.config import LifecycleConfig
    from flows.runners import with_runner

    started = time.perf_counter()
    cfg = build_config(LifecycleConfig, args.config, overrides)
    if checks is not None:
        checks(cfg)
    config = cfg.model_dump(mode="json")
    out = run_flow(call, with_runner(flow, config) if runner else flow, config)
    report(out, args, started)
    return out
