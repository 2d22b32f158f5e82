"""Model configuration and the named presets.

`ModelConfig` uses CPM-Live's field names (config/cpm-ant-10b.json), so a CPM-Live config JSON loads as is.
Presets are builder functions with literal numbers; where each number comes from is noted beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import CpmantError

QUANTIZATIONS = ("int8",)  # the values ModelConfig.quantization may take besides None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 30720  # token table rows (the prompt table is separate)
    dim_model: int = 4096  # hidden size
    dim_ff: int = 10240  # gated-GELU FFN width
    num_layers: int = 48  # layer slots (a compressed model may drop sub-blocks via mask_modules)
    num_heads: int = 32  # attention heads
    dim_head: int = 128  # size of one head
    dropout_p: float = 0.0  # dropout on attention probabilities and block outputs
    eps: float = 1e-6  # RMSNorm epsilon
    position_bias_num_buckets: int = 512  # in-segment relative-position buckets
    position_bias_max_distance: int = 2048  # longest distance the buckets resolve; also the longest sequence
    prompt_types: int = 32  # number of prompt sets (task ids)
    prompt_length: int = 32  # prompt positions at the start of every row
    segment_types: int = 32  # segment ids
    half: bool = False  # CPM-Live stores fp16 weights when true
    # one (mask_att, mask_ffn) pair per layer; True removes that sub-block. None keeps everything.
    mask_modules: tuple[tuple[bool, bool], ...] | None = None
    # compression state (None on an uncompressed model): "int8" = Linear weights stored int8 + per-row fp32 scales
    quantization: str | None = None
    # MoEfication: each FFN's neurons grouped into `moe_experts` experts, `moe_top_k` used per token
    moe_experts: int | None = None
    moe_top_k: int | None = None

    def __post_init__(self):
        if self.mask_modules is not None:
            mm = tuple(tuple(bool(x) for x in pair) for pair in self.mask_modules)
            object.__setattr__(self, "mask_modules", mm)
            if len(mm) != self.num_layers or any(len(p) != 2 for p in mm):
                raise CpmantError(
                    f"mask_modules has {len(mm)} entries but num_layers is {self.num_layers}",
                    "give one [mask_att, mask_ffn] pair per layer",
                )
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise CpmantError(f"unknown quantization {self.quantization!r}",
                              f"use one of {list(QUANTIZATIONS)} or null (float weights)")
        e, k = self.moe_experts, self.moe_top_k
        if (e is None) != (k is None):
            raise CpmantError(f"moe_experts={e!r} and moe_top_k={k!r}: a MoE model needs both",
                              "set both (e.g. moe_experts: 4, moe_top_k: 2) or neither (a dense model)")
        if e is not None and (e < 1 or self.dim_ff % e or not 1 <= k <= e):
            raise CpmantError(f"cannot split dim_ff={self.dim_ff} into moe_experts={e} with moe_top_k={k}",
                              "choose moe_experts dividing dim_ff and 1 <= moe_top_k <= moe_experts")

    # ---- helpers ---------------------------------------------------------------------------------
    def kept(self) -> tuple[int, int]:
        """(attention sub-blocks kept, FFN sub-blocks kept)."""
        if self.mask_modules is None:
            return self.num_layers, self.num_layers
        return (
            sum(not a for a, _ in self.mask_modules),
            sum(not f for _, f in self.mask_modules),
        )

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["mask_modules"] is not None:
            d["mask_modules"] = [list(p) for p in d["mask_modules"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known - {"emb_init_std"})  # CPM-Live's JSON carries emb_init_std; unused here
        if unknown:
            raise CpmantError(f"unknown model config keys: {unknown}", f"use only {sorted(known)}")
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("mask_modules") is not None:
            kw["mask_modules"] = tuple(tuple(p) for p in kw["mask_modules"])
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# ---- presets ------------------------------------------------------------------------------------
PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str):
    def deco(fn: Callable[[], ModelConfig]):
        PRESETS[name] = fn
        return fn

    return deco


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise CpmantError(f"unknown preset {name!r}", f"choose one of: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def ladder_mask(num_layers: int, att_kept: int, ffn_kept: int) -> tuple[tuple[bool, bool], ...]:
    """Spread the removed sub-blocks evenly over the layer slots (the published ladder gives counts, not positions).

    The first and last layers are always kept; removals are placed at evenly spaced interior slots.
    """

    def removed(kept: int) -> set[int]:
        drop = num_layers - kept
        if drop <= 0:
            return set()
        interior = list(range(1, num_layers - 1))
        step = len(interior) / drop
        return {interior[int(i * step + step / 2)] for i in range(drop)}

    ra, rf = removed(att_kept), removed(ffn_kept)
    return tuple((i in ra, i in rf) for i in range(num_layers))


@register_preset("tiny")
def tiny() -> ModelConfig:
    """The CPU default: trains in minutes on 2 cores. Vocab size is the target for the corpus-built vocab."""
    return ModelConfig(
        vocab_size=8000, dim_model=128, dim_ff=384, num_layers=4, num_heads=4, dim_head=32,
        position_bias_num_buckets=32, position_bias_max_distance=256,
        prompt_types=4, prompt_length=8, segment_types=4,
    )


@register_preset("small")
def small() -> ModelConfig:
    """A laptop-GPU / patient-CPU size (about 60 M parameters with the full 30720 vocab)."""
    return ModelConfig(
        vocab_size=30720, dim_model=512, dim_ff=1280, num_layers=8, num_heads=8, dim_head=64,
        position_bias_num_buckets=128, position_bias_max_distance=1024,
        prompt_types=32, prompt_length=32, segment_types=32,
    )


@register_preset("10b")
def cpm_ant_10b() -> ModelConfig:
    """config/cpm-ant-10b.json of CPM-Live (branch cpm-ant): about 9.39 B parameters."""
    return ModelConfig(
        vocab_size=30720, dim_model=4096, dim_ff=10240, num_layers=48, num_heads=32, dim_head=128,
        position_bias_num_buckets=512, position_bias_max_distance=2048, eps=1e-6,
        prompt_types=32, prompt_length=32, segment_types=32, half=True,
    )


@register_preset("7b")
def cpm_ant_7b() -> ModelConfig:
    """Published ladder: 37 attention and 32 FFN layers kept, 32 heads, dim_ff 10240 (inferred)."""
    return cpm_ant_10b().replace(mask_modules=ladder_mask(48, 37, 32))


@register_preset("3b")
def cpm_ant_3b() -> ModelConfig:
    """Published ladder: 37 attention and 32 FFN layers kept, 20 heads, dim_ff 3735."""
    return cpm_ant_10b().replace(num_heads=20, dim_ff=3735, mask_modules=ladder_mask(48, 37, 32))


@register_preset("1b")
def cpm_ant_1b() -> ModelConfig:
    """Published ladder: 25 attention and 21 FFN layers kept, 16 heads, dim_ff 700."""
    return cpm_ant_10b().replace(num_heads=16, dim_ff=700, mask_modules=ladder_mask(48, 25, 21))


@register_preset("300m")
def cpm_ant_300m() -> ModelConfig:
    """Published ladder: 25 attention and 21 FFN layers kept, 4 heads, dim_ff 350 (from a BMCook example)."""
    return cpm_ant_10b().replace(num_heads=4, dim_ff=350, mask_modules=ladder_mask(48, 25, 21))
