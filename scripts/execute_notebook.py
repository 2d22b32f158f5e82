"""Save notebooks/lifecycle.ipynb with its outputs from a micro lifecycle (the outputs the repository shows).

    .venv/bin/python scripts/execute_notebook.py [HOME]

Builds tests/_micro_lifecycle.py's micro lifecycle (a micro pretraining and one 3b rung, in Prefect's test harness,
about a minute on a CPU) into HOME (default /tmp/cpmant-micro-lifecycle, emptied first), executes the notebook in
`notebooks/` (Jupyter's working folder) with CPMANT_HOME=HOME, and writes it back in place. The notebook's first
cell says where its saved outputs came from.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "lifecycle.ipynb"


def main(argv: list[str]) -> int:
    import nbformat
    from nbclient import NotebookClient
    from prefect.testing.utilities import prefect_test_harness

    home = Path(argv[0] if argv else "/tmp/cpmant-micro-lifecycle").resolve()
    shutil.rmtree(home, ignore_errors=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from _micro_lifecycle import build

    with prefect_test_harness(server_startup_timeout=180):
        build(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["CPMANT_HOME"] = str(home)  # the kernel inherits it
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nbformat.write(nb, NOTEBOOK)
    print(f"saved {NOTEBOOK} with the outputs of the micro lifecycle in {home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
