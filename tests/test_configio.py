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
