"""`cpmant`: one console script over the flows and the registry. `cpmant VERB --help` describes each verb."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpmant.errors import CpmantError

from .env import configure_environment


def _stage_overrides(args, section: str = "pretrain") -> dict:
    from cpmant.configio import deep_merge, parse_overrides

    o: dict = {}
    p = {}
    if getattr(args, "preset", None):
        p["preset"] = args.preset
    if getattr(args, "corpus", None):
        p["corpus"] = args.corpus
    if getattr(args, "max_steps", None):
        p["max_steps"] = args.max_steps
    if getattr(args, "resume", None):
        p["resume"] = args.resume
    if getattr(args, "nproc", None):
        p["nproc"] = args.nproc
    if getattr(args, "backend", None):
        p["backend"] = args.backend
    if p:
        o[section] = p
    return deep_merge(parse_overrides(args.set), o)


def _load_lifecycle(args) -> dict:
    from cpmant.backends import get_backend
    from cpmant.configio import build_config
    from flows import LifecycleConfig

    cfg = build_config(LifecycleConfig, args.config, _stage_overrides(args))
    get_backend("train", cfg.pretrain.backend)  # a backend that cannot run here fails before any flow starts
    return cfg.model_dump(mode="json")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset (tiny, small, 10b, 7b, 3b, 1b, 300m)")
    p.add_argument("--corpus", help="folder of .txt/.jsonl files (default: Debian fortunes-zh)")
    p.add_argument("--config", help="YAML file (a saved LifecycleConfig; see configs/)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. pretrain.lr=0.05 tracking.country_iso_code=FRA")


def cmd_pretrain(args) -> int:
    from flows.pretrain import pretrain_flow

    out = pretrain_flow(_load_lifecycle(args))
    print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    return 0


def cmd_lifecycle(args) -> int:
    from flows.lifecycle import lifecycle_flow

    out = lifecycle_flow(_load_lifecycle(args))
    print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    return 0


def cmd_compress(args) -> int:
    from cpmant.configio import build_config, parse_overrides
    from flows import LifecycleConfig
    from flows.compress import compress_flow

    over = parse_overrides(args.set)
    if args.backend:
        over.setdefault("compress", {})["backend"] = args.backend
    cfg = build_config(LifecycleConfig, args.config, over).model_dump(mode="json")
    from cpmant.backends import get_backend

    get_backend("compress", cfg["compress"]["backend"])  # fail before any flow starts
    out = compress_flow(args.uri, args.recipe, cfg)
    print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    return 0


def cmd_generate(args) -> int:
    from cpmant.checkpoint import load_pretrained
    from cpmant.generate import generate
    from registry.pull import checkpoint_dir

    model, tok = load_pretrained(checkpoint_dir(args.uri))
    outs = generate(model, tok, args.text, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, seed=args.seed,
                    repetition_penalty=args.repetition_penalty)
    for text, out in zip(args.text, outs):
        print(f"{text}{out}")
    return 0


def cmd_convert(args) -> int:
    from cpmant.convert import convert

    out = convert(args.src, args.dst, args.to)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def cmd_register(args) -> int:
    from registry.register import register_checkpoint

    reg = register_checkpoint(args.dir, args.name, stage=args.stage, parent=args.parent or "",
                              alias=args.alias or None)
    print(f"registered {reg.uri}" + (f" (alias {reg.alias})" if reg.alias else ""))
    return 0


def cmd_pull(args) -> int:
    from registry.pull import download

    out = download(args.uri, args.to)
    print(f"pulled {args.uri} into {out} (every file verified against its sha256 tag)")
    return 0


def cmd_lineage(args) -> int:
    from registry.lineage import format_lineage, lineage

    chain = lineage(args.uri)
    print(json.dumps(chain, indent=2) if args.json else format_lineage(chain))
    return 0


def cmd_serve(args) -> int:
    """`mlflow models serve` on the version, with this environment (--env-manager local), on 127.0.0.1."""
    import os
    import subprocess

    from registry.pull import resolve_version
    from registry.tracking import setup_tracking, tracking_uri

    setup_tracking()
    if args.uri.startswith("models:/"):
        name, version = resolve_version(args.uri)
        model_uri = f"models:/{name}/{version}"
    else:
        model_uri = args.uri
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    print(f"serving {model_uri} on http://{args.host}:{args.port}/invocations", flush=True)
    # mlflow execs `uvicorn` by name: put this environment's scripts first on PATH even when it is not activated
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri(), "MLFLOW_REGISTRY_URI": tracking_uri()}
    return subprocess.call(cmd, env=env)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cpmant", description="The whole life of a CPM-Ant model: Prefect flows, "
                                 "MLflow tracking and registry. State lives under CPMANT_HOME (default ./.cpmant).")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("lifecycle", help="run every stage on the embedded default (now: pretrain, compress)")
    _add_run_args(p)
    p.set_defaults(fn=cmd_lifecycle)

    p = sub.add_parser("pretrain", help="pretrain a preset on a corpus and register cpm-ant-<preset>")
    _add_run_args(p)
    p.add_argument("--resume", help="auto (continue the latest complete checkpoint), never, or a step folder")
    p.add_argument("--nproc", type=int, help="processes through torchrun (gloo on CPU)")
    p.add_argument("--backend", choices=["torch", "bmtrain"], help="training backend (bmtrain needs CUDA)")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("compress", help="compress a registered model into size variants (the published ladder)")
    p.add_argument("uri", help="the parent: models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--recipe", default=None,
                   help="7b, 3b, 1b, 300m, int8, moe, all (the four ladder rungs), a comma list, or recipe YAML "
                        "files; default: the config's compress.recipes (all,int8)")
    p.add_argument("--config", help="YAML file (a saved LifecycleConfig; its compress section applies)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. compress.eval_rows=32")
    p.add_argument("--backend", choices=["torch", "bmcook"], help="compression backend (bmcook needs CUDA)")
    p.set_defaults(fn=cmd_compress)

    p = sub.add_parser("generate", help="continue a text with a registered model")
    p.add_argument("uri", help="models:/NAME/VERSION, models:/NAME@ALIAS or a checkpoint folder")
    p.add_argument("text", nargs="+", help="prompt text(s)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("pull", help="download a version's checkpoint, verifying every file's sha256")
    p.add_argument("uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--to", required=True, help="a new or empty folder")
    p.set_defaults(fn=cmd_pull)

    p = sub.add_parser("serve", help="serve a version over HTTP (MLflow's /invocations protocol) on 127.0.0.1")
    p.add_argument("uri")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--workers", type=int, default=1)
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
    p.add_argument("--stage", default="pretrain", choices=["pretrain", "compress", "delta"])
    p.add_argument("--parent", default="", help="the parent's models:/NAME/VERSION")
    p.add_argument("--alias", default="candidate", help="alias to set ('' for none)")
    p.set_defaults(fn=cmd_register)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_environment()
        return args.fn(args)
    except CpmantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
