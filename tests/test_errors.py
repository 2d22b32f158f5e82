"""Bad input gets one clear error that names the problem and the fix."""

from __future__ import annotations

import pytest

from cpmant.config import get_preset
from cpmant.configio import build_config, parse_overrides
from cpmant.errors import CpmantError
from cpmant.training.config import PretrainConfig

pytestmark = pytest.mark.unit


def test_unknown_preset():
    with pytest.raises(CpmantError, match="unknown preset 'huge'") as e:
        get_preset("huge")
    assert "tiny" in e.value.fix and "10b" in e.value.fix


def test_unknown_preset_through_the_cli(capsys):
    from cpmant_cli.main import main

    assert main(["pretrain", "--preset", "huge", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err and "choose one of" in err and "fix:" in err


def test_unwritable_home(tmp_path, monkeypatch, capsys):
    from cpmant.paths import cpmant_home
    from cpmant_cli.main import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("CPMANT_HOME", str(blocker / "home"))
    with pytest.raises(CpmantError, match="not writable") as e:
        cpmant_home()
    assert "CPMANT_HOME" in e.value.fix
    assert main(["pretrain", "--max-steps", "1"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_config_errors_are_collected(tmp_path):
    with pytest.raises(CpmantError) as e:
        build_config(PretrainConfig, None, parse_overrides(["seq_len=4", "lr=-1", "nosuch=1"]))
    msg = str(e.value)
    assert "seq_len" in msg and "lr" in msg and "nosuch" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("seq_len: [1, 2\n")
    with pytest.raises(CpmantError, match="not valid YAML"):
        build_config(PretrainConfig, bad)
    with pytest.raises(CpmantError, match="does not exist"):
        build_config(PretrainConfig, tmp_path / "missing.yaml")


def test_model_overrides_with_unknown_field():
    """Checked when the config is built, before any corpus is prepared."""
    with pytest.raises(CpmantError, match="model_overrides") as e:
        build_config(PretrainConfig, None, {"model_overrides": {"dim_modle": 8}})
    assert "dim_modle" in str(e.value)
