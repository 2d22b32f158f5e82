"""configio: YAML files and dotted overrides give one clear error, and the errors' own examples work."""

from __future__ import annotations

import re

import pytest

from cpmant.configio import build_config, parse_overrides
from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit


def lifecycle_config():
    from flows.config import LifecycleConfig

    return LifecycleConfig


def test_config_pointing_at_a_folder_says_it_is_a_folder(tmp_path):
    with pytest.raises(CpmantError) as e:
        build_config(lifecycle_config(), tmp_path)
    assert "is a folder" in e.value.problem and "does not exist" not in e.value.problem
    assert "YAML file" in e.value.fix
    with pytest.raises(CpmantError, match="does not exist"):
        build_config(lifecycle_config(), tmp_path / "missing.yaml")


def test_override_error_example_is_accepted():
    with pytest.raises(CpmantError) as e:
        parse_overrides(["pretrain.lr"])
    example = re.search(r"e\.g\. (\S+=\S+)", e.value.fix).group(1)
    cfg = build_config(lifecycle_config(), None, parse_overrides([example]))
    key, value = example.split("=")
    section, field = key.split(".")
    assert getattr(getattr(cfg, section), field) == pytest.approx(float(value))
    with pytest.raises(CpmantError, match="train"):  # the example it replaces names no section
        build_config(lifecycle_config(), None, parse_overrides(["train.lr=0.01"]))


def test_yaml_problems_are_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [1, 2\n", encoding="utf-8")
    with pytest.raises(CpmantError, match="not valid YAML"):
        build_config(lifecycle_config(), bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(CpmantError, match="mapping at top level"):
        build_config(lifecycle_config(), lst)


def test_tune_tasks_and_methods_are_lists_checked_once():
    """`tune.tasks` / `tune.methods`: a comma list (YAML, flags) or a list give the same list; an unknown name is one
    CpmantError naming it, with the known names as the fix."""
    from cpmant.delta.config import TuneConfig

    assert TuneConfig(tasks="demo-ccpm, demo-c3").tasks == TuneConfig(tasks=["demo-ccpm", "demo-c3"]).tasks == [
        "demo-ccpm", "demo-c3"]
    assert TuneConfig(methods="lora,full,lora").methods == ["lora", "full"]  # the first of repeats
    assert TuneConfig().model_dump(mode="json")["methods"] == ["lora", "full"]  # a list in the saved config
    cfg = build_config(lifecycle_config(), None, {"tune": {"tasks": "demo-c3,demo-ccpm", "methods": "full"}})
    assert cfg.tune.tasks == ["demo-c3", "demo-ccpm"] and cfg.tune.methods == ["full"]
    for field, value, known in (("tasks", "demo-ccpm,nope", "demo-ccpm"), ("methods", ["lora", "nope"], "bitfit")):
        with pytest.raises(CpmantError) as e:
            TuneConfig(**{field: value})
        assert e.value.problem.startswith("unknown ") and "'nope'" in e.value.problem
        assert f"tune.{field}" in e.value.problem and known in e.value.fix
    with pytest.raises(CpmantError, match="no task given"):
        TuneConfig(tasks=" , ")
