"""The peak memory `cpmant generate --memory-budget` prints counts loading and generating only: for a registry URI
it does not include MLflow's import and the files' fetch (issue 17, bad input 13: about 160 MiB more than for the
same model's folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import registered_micro_model

pytestmark = pytest.mark.unit


def _peak_mib(home, model: str) -> float:
    """The peak printed by the console script in a fresh process (nothing imported or fetched before it starts)."""
    env = {**os.environ, "CPMANT_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "cpmant_cli.main", "generate", model, "床前", "--max-new-tokens", "2",
                        "--memory-budget", "1GB"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    m = re.search(r"peak memory ([\d.]+) MiB above the baseline", p.stderr)
    assert m, p.stderr
    assert "for loading and generating" in p.stderr and "after the model files are fetched" in p.stderr
    return float(m.group(1))


def test_registry_uri_peak_excludes_the_fetch(tmp_path, fixture_corpus):
    mp, model_dir, _ = registered_micro_model(tmp_path / "home", fixture_corpus)
    try:
        from_registry = _peak_mib(tmp_path / "home", "models:/cpm-ant-tiny/1")  # fetched into the cache here
        from_folder = _peak_mib(tmp_path / "home", str(model_dir))
    finally:
        mp.undo()
    # the micro model is well under 1 MiB: both peaks are the same loading and generating, up to allocator noise
    assert abs(from_registry - from_folder) < 20, (from_registry, from_folder)
