"""Environment defaults set before Prefect or MLflow is imported: homes under CPMANT_HOME, telemetry off, and an
ephemeral Prefect API start-up timeout that suits a 2-core machine. Explicit settings in the environment win."""

from __future__ import annotations

import os


def configure_environment() -> None:
    from cpmant.paths import cpmant_home

    home = cpmant_home()
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_API_REQUEST_TIMEOUT": "120",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "5",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
