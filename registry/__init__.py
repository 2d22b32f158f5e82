"""MLflow: tracking set-up, the pyfunc model, registering with the contract's tags, aliases."""

from .tracking import setup_tracking, tracking_uri  # noqa: F401
