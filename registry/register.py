"""Register a checkpoint folder as a version of a registered model, with the contract's tags and an alias.

Every version carries `cpmant.stage`, `cpmant.parent`, `cpmant.checkpoint_sha256`, `cpmant.config_sha256`,
`cpmant.data_sha256`, `cpmant.git_sha`. A failed registration leaves the checkpoint where it is and says how to
register it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cpmant.checkpoint import WEIGHTS_FILE, read_meta, sha256_file
from cpmant.errors import CpmantError

from .params import DEFAULT_PARAMS
from .tracking import setup_tracking

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
STAGES = ("pretrain", "compress", "delta")


@dataclass(frozen=True)
class Registered:
    name: str
    version: int
    run_id: str
    alias: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "transformers", "safetensors", "jieba", "numpy", "mlflow", "cpmant"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return reqs


def version_tags(model_dir: Path, stage: str, parent: str = "") -> dict[str, str]:
    meta = read_meta(model_dir)
    return {
        "cpmant.stage": stage,
        "cpmant.parent": parent,
        "cpmant.checkpoint_sha256": sha256_file(model_dir / WEIGHTS_FILE),
        "cpmant.config_sha256": str(meta.get("config_sha256", "")),
        "cpmant.data_sha256": str(meta.get("data_sha256", "")),
        "cpmant.git_sha": str(meta.get("git_sha", "")),
    }


def register_checkpoint(model_dir: str | Path, name: str, stage: str = "pretrain", parent: str = "",
                        alias: str | None = "candidate", extra_tags: dict[str, str] | None = None) -> Registered:
    """Log `model_dir` as a pyfunc model in the active run (or a new one) and register it as a new version of `name`."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    model_dir = Path(model_dir).resolve()
    if stage not in STAGES:
        raise CpmantError(f"unknown stage {stage!r}", f"use one of {STAGES}")
    tags = {**version_tags(model_dir, stage, parent), **(extra_tags or {})}
    again = f"the checkpoint is kept at {model_dir}; register it again with `cpmant register {model_dir} --name {name}`"
    try:
        setup_tracking()
        started = mlflow.active_run() is None
        run = mlflow.start_run(run_name=f"register-{name}") if started else mlflow.active_run()
        try:
            example = pd.DataFrame({"text": ["床前明月光"]})
            signature = infer_signature(example, ["，疑是地上霜。"], params=_default_params())
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(model_dir)},
                signature=signature, input_example=example, pip_requirements=pip_requirements(),
            )
            mv = mlflow.register_model(info.model_uri, name, tags=tags)
            client = MlflowClient()
            client.update_model_version(name, mv.version, description=f"{stage} checkpoint from {model_dir.name}")
            if alias:
                client.set_registered_model_alias(name, alias, mv.version)
        finally:
            if started:
                mlflow.end_run()
    except CpmantError as e:
        raise CpmantError(f"registering {name} failed: {e.problem}", f"{e.fix}; {again}") from e
    except Exception as e:  # MLflow/store errors: keep the checkpoint, say how to retry
        raise CpmantError(f"registering {name} failed: {type(e).__name__}: {e}", again) from e
    return Registered(name, int(mv.version), run.info.run_id, alias)


def _default_params() -> dict:
    return dict(DEFAULT_PARAMS)
