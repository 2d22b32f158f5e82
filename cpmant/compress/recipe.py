"""Compression recipes: what to keep relative to the base, and which methods run in which order.

The published ladder (CPM-ANT.md) is expressed as shares of the 10B's 48 layer slots, 32 heads and dim_ff 10240,
so the same recipe gives the published shapes on the `10b` preset and the same proportions on any other base.
A user recipe is a YAML file holding one `Recipe`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import ModelConfig
from ..configio import FrozenModel, build_config
from ..errors import CpmantError

BASE_LAYERS, BASE_HEADS, BASE_FF = 48, 32, 10240  # the 10B the ladder was cut from


class DistillConfig(FrozenModel):
    steps: int = Field(200, ge=0, description="recovery-training steps (0 = none)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (cosine after a short warmup)")
    warmup_steps: int = Field(20, ge=0, description="linear warmup")
    temperature: float = Field(2.0, gt=0, description="logit KL temperature (BMCook's `ce_temp`)")
    kl_weight: float = Field(1.0, ge=0, description="weight of the logit KL term")
    ce_weight: float = Field(1.0, ge=0, description="weight of the plain LM loss on the corpus")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the hidden-state MSE (BMCook's `mse_hidn`)")
    micro_batch_size: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=16)
    save_interval: int = Field(100, ge=1)
    seed: int = 0


class Recipe(FrozenModel):
    name: str = Field(..., description="suffix of the registered name: <base>-<name>")
    methods: list[Literal["prune", "distill", "quantize", "moefy"]] = Field(
        default_factory=lambda: ["prune", "distill"], description="applied in this order")
    att_keep: float = Field(1.0, gt=0, le=1, description="share of attention sub-layers kept")
    ffn_keep: float = Field(1.0, gt=0, le=1, description="share of FFN sub-layers kept")
    heads_keep: float = Field(1.0, gt=0, le=1, description="share of attention heads kept")
    dim_ff_keep: float = Field(1.0, gt=0, le=1, description="share of FFN width kept")
    quantize_bits: Literal[8] = Field(8, description="int8 weights with per-output-channel scales")
    qat: bool = Field(False, description="quantization-aware distillation: fake-int8 weights while distilling "
                                         "(needs distill before quantize in methods)")
    moe_experts: int = Field(8, ge=2, description="MoEfication: experts per FFN")
    moe_top_k: int = Field(2, ge=1, description="MoEfication: experts used per token")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    published_loss_increase: float | None = Field(None, description="the published ladder's increase over 10B")

    @model_validator(mode="after")
    def _check(self):
        if self.moe_top_k > self.moe_experts:
            raise ValueError("moe_top_k must not exceed moe_experts")
        m = list(self.methods)
        if self.qat and not ("distill" in m and "quantize" in m and m.index("distill") < m.index("quantize")):
            raise ValueError("qat needs methods with distill before quantize")
        return self

    def target_shape(self, base: ModelConfig) -> dict:
        """The student's shape on `base`: kept sub-layers, heads and dim_ff, rounded half up, at least one of each."""
        att0, ffn0 = base.kept()

        def keep(n: int, share: float) -> int:
            return max(1, math.floor(n * share + 0.5))  # half up: 4 heads x 62.5% keeps 3, not round()'s 2

        return {
            "att_layers": keep(att0, self.att_keep),
            "ffn_layers": keep(ffn0, self.ffn_keep),
            "num_heads": keep(base.num_heads, self.heads_keep),
            "dim_ff": keep(base.dim_ff, self.dim_ff_keep),
        }


def _ladder(name: str, att: int, ffn: int, heads: int, dim_ff: int, published: float) -> Recipe:
    return Recipe(name=name, att_keep=att / BASE_LAYERS, ffn_keep=ffn / BASE_LAYERS, heads_keep=heads / BASE_HEADS,
                  dim_ff_keep=dim_ff / BASE_FF, published_loss_increase=published)


# The published ladder (CPM-ANT.md): kept sub-layers, heads, dim_ff; LM loss 2.420 (10B) -> 2.510, 2.603, 2.759,
# 2.998, i.e. +3.7%, +7.6%, +14.0%, +23.9%.
RECIPES: dict[str, Recipe] = {
    "7b": _ladder("7b", 37, 32, 32, 10240, 2.510 / 2.420 - 1),
    "3b": _ladder("3b", 37, 32, 20, 3735, 2.603 / 2.420 - 1),
    "1b": _ladder("1b", 25, 21, 16, 700, 2.759 / 2.420 - 1),
    "300m": _ladder("300m", 25, 21, 4, 350, 2.998 / 2.420 - 1),
    "int8": Recipe(name="int8", methods=["quantize"]),
    "moe": Recipe(name="moe", methods=["moefy"]),
}
LADDER = ("7b", "3b", "1b", "300m")


def get_recipes(spec: str) -> list[Recipe]:
    """`3b`, `all` (the four ladder recipes), a comma list (`all,int8`), or paths to recipe YAML files."""
    out: list[Recipe] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "all":
            out += [RECIPES[n] for n in LADDER]
        elif item in RECIPES:
            out.append(RECIPES[item])
        elif item.endswith((".yaml", ".yml")):
            out.append(build_config(Recipe, Path(item)))
        else:
            raise CpmantError(f"unknown recipe {item!r}",
                              f"use one of {', '.join(RECIPES)}, all, or a recipe YAML file (see configs/recipes/)")
    if not out:
        raise CpmantError("no recipe given", "pass --recipe 3b, --recipe all, or --recipe my-recipe.yaml")
    return out
