"""notebooks/lifecycle.ipynb runs top to bottom (nbclient, the venv's python3 kernel) on a micro lifecycle's store,
passed through MLFLOW_TRACKING_URI, and shows the runs, the loss curves, the ladder and the lineage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _micro_lifecycle import build

pytestmark = pytest.mark.flow
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "lifecycle.ipynb"


def test_notebook_runs_on_a_micro_lifecycle(prefect_harness, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    lc = build()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", lc["tracking_uri"])  # the kernel inherits it
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent.parent)}}).execute()
    text, images, errors = [], 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type == "error":
                errors.append(out.ename)
            elif "data" in out:
                images += "image/png" in out["data"]
                text.append(out["data"].get("text/plain", ""))
    text = "\n".join(text)
    assert not errors
    assert f"tracking store: {lc['tracking_uri']}" in text
    assert images >= 3  # loss curves, ladder, energy per stage
    assert "pretrain-tiny" in text and "compress-3b" in text  # the runs table
    assert "models:/cpm-ant-tiny-3b/1" in text  # the ladder table and the lineage
    assert lc["pretrain"]["run_id"] in text
    assert "delta tuning: not run yet" in text and "validation: not run yet" in text
    assert "Downloading artifacts" not in text
    assert os.environ["MLFLOW_TRACKING_URI"] == lc["tracking_uri"]
