"""--backend bminf: BMInf 2.0's own wrapper behind the same loader (CUDA only; imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from ..errors import CpmantError


# ---- BMInf itself (--backend bminf) ----------------------------------------------------------------------------
class _BlockListView(nn.Module):
    """BMInf's TransformerBlockList under the name `encoder.layers`: it iterates but has no len(), which
    CPMAnt.inference needs (KVCache(len(layers)))."""

    def __init__(self, blocks: nn.Module, n: int):
        super().__init__()
        self.blocks, self.n = blocks, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, i):
        return self.blocks[i]


def _to_torch_linears(model: nn.Module) -> int:
    """Encoder Linears -> torch.nn.Linear with the 1/sqrt(dim_in) folded into the weight (the same function): BMInf
    quantizes only torch.nn.Linear."""
    from ..layers import Linear

    n = 0
    for parent in list(model.encoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                lin = nn.Linear(child.dim_in, child.dim_out, bias=False, device="meta")
                lin.weight = nn.Parameter((child.weight.detach().float() * child.scale).to(child.weight.dtype),
                                          requires_grad=False)
                setattr(parent, name, lin)
                n += 1
    return n


def load_with_bminf(checkpoint_dir: str | Path, budget_bytes: Optional[int] = None, int8: bool = True):
    """(model on CUDA, tokenizer) through `bminf.wrapper(model, quantization=int8, memory_limit=budget_bytes)`.
    Needs CUDA and bminf 2.0.1 (`cpmant.backends.get_backend("infer", "bminf")` says why not). Unverified without
    a GPU (gpu-tier test in tests/test_gpu.py)."""
    from ..backends import get_backend
    from ..checkpoint import load_pretrained

    get_backend("infer", "bminf")
    import bminf  # noqa: PLC0415 (lazy: importing it without a CUDA driver fails)

    model, tok = load_pretrained(checkpoint_dir)
    if model.config.quantization is not None or model.config.moe_experts is not None:
        raise CpmantError("--backend bminf takes dense float checkpoints (BMInf quantizes them itself)",
                          "use --backend torch for int8 and MoE checkpoints")
    n_layers = len(model.encoder.layers)
    _to_torch_linears(model)
    try:
        model = bminf.wrapper(model, quantization=int8, memory_limit=budget_bytes)
    except ValueError as e:  # layers of different shapes (a compressed variant)
        raise CpmantError(f"BMInf cannot schedule this model's layers: {e}",
                          "use --backend torch: it streams layers of any shape") from None
    if not hasattr(model.encoder.layers, "__len__"):
        model.encoder.layers = _BlockListView(model.encoder.layers, n_layers)
    return model.eval(), tok
