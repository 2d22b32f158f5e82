"""The one model factory: `build_model(config)` makes the CPM-Ant a config describes, dense, MoE, int8 or both.

The config says what the model is (`mask_modules`, `moe_experts` / `moe_top_k`, `quantization`); this module puts the
matching modules in place (`cpmant.modules.moe.MoEFeedForward`, `cpmant.modules.quant.QuantLinear`). Loading a
checkpoint builds with `meta=True` and assigns the saved tensors (no random init that the weights would overwrite);
compression methods convert a dense model's weights and never need this module's help to load their results.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import ModelConfig
from .model import CPMAnt
from .modules.moe import swap_in_moe
from .modules.quant import swap_in_quant_linears


def build_model(config: ModelConfig, device=None, dtype: Optional[torch.dtype] = None, *,
                meta: bool = False) -> CPMAnt:
    """The model of `config` on `device` (default cpu) with float weights in `dtype` (default: torch's default).

    meta=True builds on the meta device (no memory, no init): load a state dict with `assign=True` next.
    MoE FFNs start with a zero router and int8 Linears with zero weights: they are for loading a saved state dict;
    a dense model gets CPM-Live's random init. `config` is validated by ModelConfig itself.
    """
    device = torch.device("meta") if meta else torch.device(device) if device is not None else torch.device("cpu")
    prev = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with device:
            model = CPMAnt(config)
            if config.moe_experts is not None:
                swap_in_moe(model, config.moe_experts, config.moe_top_k)
            if config.quantization == "int8":
                swap_in_quant_linears(model, from_weights=False)
    finally:
        torch.set_default_dtype(prev)
    return model
