"""notebooks/lifecycle.ipynb runs top to bottom (nbclient, the venv's python3 kernel) in `notebooks/` (Jupyter's
working folder) on a micro lifecycle's store, passed through MLFLOW_TRACKING_URI, and shows the runs, the loss
curves, the ladder and the lineage; without CPMANT_HOME it finds the repository root's `.cpmant` as the CLI makes
it, and with no store it says there are no runs yet (creating nothing). The committed notebook holds its outputs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from _micro_lifecycle import build

pytestmark = pytest.mark.flow
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "lifecycle.ipynb"
SAVED_FROM = "/tmp/cpmant-micro-lifecycle"  # scripts/execute_notebook.py's home, named in the notebook's first cell


def _outputs(nb) -> tuple[str, int, list[str]]:
    """(the text of every output, the number of PNG images, the names of errors raised)."""
    text, images, errors = [], 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type == "error":
                errors.append(f"{out.ename}: {out.evalue}")
            elif "data" in out:
                images += "image/png" in out["data"]
                text.append(out["data"].get("text/plain", ""))
    return "\n".join(text), images, errors


def _execute(workdir: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return _outputs(nb)


def test_notebook_runs_on_a_micro_lifecycle(prefect_harness, monkeypatch):
    lc = build()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", lc["tracking_uri"])  # the kernel inherits it
    text, images, errors = _execute(NOTEBOOK.parent)
    assert not errors
    assert f"tracking store: {lc['tracking_uri']}" in text
    assert images >= 3  # loss curves, ladder, energy per stage
    assert "pretrain-tiny" in text and "compress-3b" in text  # the runs table
    assert "models:/cpm-ant-tiny-3b/1" in text  # the ladder table and the lineage
    assert lc["pretrain"]["run_id"] in text
    assert "delta tuning: not run yet" in text and "validation: not run yet" in text
    assert "1 chain (one per version nobody descends from), 2 registered models" in text
    assert "Downloading artifacts" not in text
    assert os.environ["MLFLOW_TRACKING_URI"] == lc["tracking_uri"]


def test_notebook_finds_the_home_as_the_cli_makes_it(prefect_harness, monkeypatch, tmp_path):
    """Run from `notebooks/` with neither CPMANT_HOME nor MLFLOW_TRACKING_URI: the repository root's `.cpmant`."""
    lc = build()
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / ".cpmant").symlink_to(lc["home"], target_is_directory=True)
    monkeypatch.delenv("CPMANT_HOME")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text, _, errors = _execute(root / "notebooks")
    assert not errors
    assert f"the .cpmant of {root.resolve()}" in text
    assert f"tracking store: sqlite:///{(root / '.cpmant').resolve() / 'mlflow.db'}" in text
    assert "compress-3b" in text and "models:/cpm-ant-tiny-3b/1" in text
    assert not (root / "notebooks" / ".cpmant").exists()


def test_notebook_without_a_store_says_there_are_no_runs(monkeypatch, tmp_path):
    root = tmp_path / "fresh"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.delenv("CPMANT_HOME")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text, images, errors = _execute(root / "notebooks")
    assert not errors  # once "KeyError: ['status'] not in index"
    assert f"no runs yet: there is no store at {root.resolve() / '.cpmant' / 'mlflow.db'}" in text
    for section in ("pretraining", "compression ladder", "delta tuning", "validation", "registered models"):
        assert f"{section}: not run yet" in text
    assert not (root / ".cpmant").exists() and not (root / "notebooks" / ".cpmant").exists()  # nothing created


@pytest.mark.unit
def test_the_committed_notebook_holds_its_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("outputs") for c in code)  # every code cell ran
    text, images, errors = _outputs(nb)
    assert not errors and images >= 3
    assert "tracking store: sqlite:///" in text and "compress-3b" in text
    # every absolute temporary path in the outputs is the micro lifecycle's home, which the first cell names
    assert set(re.findall(r"/tmp/[\w.-]+", text)) == {SAVED_FROM}
    assert SAVED_FROM in nb.cells[0].source and "tests/_micro_lifecycle.py" in nb.cells[0].source
