"""MLflow: tracking set-up, the pyfunc model, registering with the contract's tags, pulls, lineage, aliases.

    from registry import pull
    model = pull("models:/cpm-ant-tiny@champion")
    model.generate("床前明月光")
"""

from .aliases import get_alias, promote, set_alias  # noqa: F401
from .lineage import format_lineage, lineage  # noqa: F401
from .pull import checkpoint_dir, download, pull  # noqa: F401
from .tracking import setup_tracking, tracking_uri  # noqa: F401
