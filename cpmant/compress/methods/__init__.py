"""Compression methods, each one module holding all of it (its config, its `apply`, its algorithm) that registers
itself (as PEFT's tuners do).

`METHODS` maps a method name to its `Method` (config class, apply function, CompressConfig fields used);
importing this package registers the built-in ones: prune, distill, quantize, moefy. Importance scoring, which
prune and moefy share, is `cpmant.compress.importance`.
"""

from .base import (METHODS, ROW_LENGTH, Method, MethodConfig, MethodContext, method_config, method_names,
                   register_method)
from .prune import PruneConfig  # noqa: E402  (each import registers its method)
from .distill import DistillConfig  # noqa: E402
from .quantize import QuantizeConfig  # noqa: E402
from .moefy import MoefyConfig  # noqa: E402

__all__ = ["METHODS", "ROW_LENGTH", "Method", "MethodConfig", "MethodContext", "method_config", "method_names",
           "register_method", "PruneConfig", "DistillConfig", "QuantizeConfig", "MoefyConfig"]
