"""Every shipped YAML parses into its schema, and every deployment in prefect.yaml points at a real flow with
parameters that validate."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from cpmant.configio import build_config
from flows.config import LifecycleConfig, check_force

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = build_config(LifecycleConfig, path)
    assert cfg.pretrain.preset
    assert isinstance(cfg.tune.tasks, list) and isinstance(cfg.tune.methods, list)  # "a,b" in YAML: read as a list


def test_prefect_yaml_deployments():
    from prefect.flows import Flow

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"pretrain", "lifecycle"} <= names
    for dep in spec["deployments"]:
        module_path, func = dep["entrypoint"].split(":")
        mod = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        fl = getattr(mod, func)
        assert isinstance(fl, Flow)
        LifecycleConfig.model_validate(dep["parameters"].get("config", {}))
        check_force(dep["parameters"].get("force", False))  # a deployment's force: what the flows accept
        assert dep["work_pool"]["name"] == "cpmant-process"
        for sched in dep.get("schedules", []):
            assert len(sched["cron"].split()) == 5
