"""`cpmant rerun` (the CLI layer: it reads the registry and runs the flows): replay a recorded training run (and
the runs that made its parent) into a fresh CPMANT_HOME, from what the tracking store recorded, and compare every
reproducible metric to the last digit.

    rerun(ref, home, strict=False, progress=print) -> dict

The recorded runs are read from the current store first (registry.rerun); then CPMANT_HOME points at `home` (its
own MLflow store, corpus cache, runs; MLFLOW_TRACKING_URI unset for the duration: registry.rerun.in_home) and the
stage flows run there with `force` (nothing reused). The environment is restored afterwards. Every MLflow call is
registry/'s.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from cpmant.errors import CpmantError


def _fresh(home: str | Path) -> Path:
    p = Path(home).expanduser().resolve()
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise CpmantError(f"{p} is not an empty folder", "pass --home a new or empty folder: the rerun gets a store "
                                                         "of its own there")
    p.mkdir(parents=True, exist_ok=True)
    return p


def code_check(recorded_sha: str, strict: bool, now: str | None = None) -> str | None:
    """A warning when the code version differs from the recorded one (a CpmantError with `strict`). `now`: this
    checkout's version (cpmant.checkpoint.git_sha() when None)."""
    if now is None:
        from cpmant.checkpoint import git_sha

        now = git_sha()
    if not recorded_sha:
        msg = f"the run records no code version; this checkout is {now}"
    elif recorded_sha != now:
        msg = f"the run was made by code {recorded_sha}, this checkout is {now}: numbers may differ"
    else:
        return None
    if strict:
        raise CpmantError(f"--strict: {msg}", f"check out {recorded_sha or 'the recorded code'} (git checkout "
                                              f"{recorded_sha.removesuffix('-dirty') or '...'}), or drop --strict")
    warnings.warn(msg, UserWarning, stacklevel=2)
    return msg


def _recipe_file(recipe: dict, home: Path) -> str:
    """The recorded recipe as a YAML file the compress flow reads (exactly as recorded, built-in or not)."""
    import yaml

    from cpmant.compress.recipe import Recipe

    Recipe.model_validate(recipe)  # a recipe the code no longer accepts fails here, clearly
    path = home / "rerun" / f"recipe-{recipe['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return str(path)


def _pretrain_config(rec) -> dict:
    cfg = {k: v for k, v in rec.config.items() if k in ("pretrain", "tracking")}
    pre = dict(cfg.get("pretrain") or {})
    pre["output_dir"] = None  # under the new home
    pre["resume"] = "never"  # from step 0
    cfg["pretrain"] = pre
    cfg["tracking"] = {k: v for k, v in (cfg.get("tracking") or {}).items()
                       if k not in ("parent_run_id", "register_alias")}
    return cfg


def _compress_config(rec) -> dict:
    cfg = {k: v for k, v in rec.config.items() if k in ("compress", "tracking")}
    comp = dict(cfg.get("compress") or {})
    comp["output_dir"] = None
    cfg["compress"] = comp
    cfg["tracking"] = {k: v for k, v in (cfg.get("tracking") or {}).items()
                       if k not in ("parent_run_id", "register_alias")}
    return cfg


def rerun(ref: str, home: str | Path, strict: bool = False, progress=print) -> dict:
    """Replay `ref` (a run id or model URI in the current store) into the fresh CPMANT_HOME `home`.

    Returns {"home", "code_warning", "stages": [{"stage", "recorded_run", "new_run", "model", "config_source",
    "missing", "compared", "skipped", "differences"}], "equal": bool}."""
    from registry.rerun import compare_metrics, in_home, metric_histories, recorded_chain, version_record

    chain = recorded_chain(ref)
    recorded = {rec.run_id: metric_histories(rec.run_id) for rec in chain}  # read before the store changes
    warning = None
    for rec in chain:
        warning = code_check(rec.git_sha, strict) or warning
    target = _fresh(home)
    results = []
    with in_home(target):
        from flows.compress import compress_flow
        from flows.pretrain import pretrain_flow

        new_uri = {}  # recorded version -> the rerun's version
        for rec in chain:
            progress(f"rerun {rec.stage} run {rec.run_id} ({rec.run_name}) into {target}")
            if rec.stage == "pretrain":
                out = pretrain_flow(_pretrain_config(rec), force=True)
                model = out["model_uri"]
            else:
                cfg = _compress_config(rec)
                if rec.parent not in new_uri:
                    raise CpmantError(f"the parent {rec.parent} of run {rec.run_id} was not rerun",
                                      "rerun the pretraining run that made it, or pass the variant's model URI")
                out = compress_flow(new_uri[rec.parent], _recipe_file(rec.recipe, target), cfg, force=True)
                model = out["variants"][0]
            registered_by, new_data = version_record(model)
            new_run = out["run_id"] if rec.stage == "pretrain" else registered_by
            if rec.data_sha256 and new_data and new_data != rec.data_sha256:
                raise CpmantError(f"the rerun's data hash {new_data[:16]} differs from the recorded "
                                  f"{rec.data_sha256[:16]}: the corpus changed",
                                  "restore the corpus the run recorded (its path is the run's `corpus` param)")
            new_uri[rec.version] = model
            results.append({"stage": rec.stage, "recorded_run": rec.run_id, "new_run": new_run, "model": model,
                            "config_source": rec.config_source, "missing": rec.missing})
    # compare: the recorded runs (read from the current store above) with the new ones in the new home's store
    with in_home(target):
        from registry.tracking import setup_tracking

        setup_tracking()
        new = {r["new_run"]: metric_histories(r["new_run"]) for r in results}
    for r in results:
        r.update(compare_metrics(recorded[r["recorded_run"]], new[r["new_run"]]))
    return {"home": str(target), "code_warning": warning, "stages": results,
            "equal": all(not r["differences"] for r in results)}
