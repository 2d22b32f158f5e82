"""MLflow: tracking set-up, the pyfunc model, registering with the contract's tags, pulls, lineage, aliases.

    from registry import pull
    model = pull("models:/cpm-ant-tiny@champion")
    model.generate("床前明月光")

No function here shares its name with a submodule: `registry.pull` and `registry.lineage` are functions (their
modules are `registry.pulling` and `registry.ancestry`); serving is `from registry.serve import serve`.
"""

from .aliases import get_alias, promote, remove_alias, set_alias  # noqa: F401
from .ancestry import format_lineage, lineage  # noqa: F401
from .pulling import checkpoint_dir, download, pull, resolve_version  # noqa: F401
from .register import find_version, register_checkpoint  # noqa: F401
from .tracking import setup_tracking, tracking_uri  # noqa: F401
