"""Compression methods, each a small module with its own config that registers itself (as PEFT's tuners do).

`METHODS` maps a method name to its `Method` (config class, apply function, CompressConfig fields used);
importing this package registers the built-in ones: prune, distill, quantize, moefy.
"""

from .base import METHODS, Method, MethodConfig, MethodContext, method_config, method_names, register_method
from .prune import PruneConfig  # noqa: E402  (each import registers its method)
from .distill import DistillConfig  # noqa: E402
from .quantize import QuantizeConfig  # noqa: E402
from .moefy import MoefyConfig  # noqa: E402

__all__ = ["METHODS", "Method", "MethodConfig", "MethodContext", "method_config", "method_names",
           "register_method", "PruneConfig", "DistillConfig", "QuantizeConfig", "MoefyConfig"]
