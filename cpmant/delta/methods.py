"""Delta-tuning methods, registered by name: OpenDelta 0.3.2 on our own `CPMAnt` (as CPM-Live did with its model).

    handle = apply_delta(model, "lora")                    # {"r": 8, "alpha": 16} ... as params
    trainable_parameters(model)                            # 16,384 on `tiny`, 6,291,456 on `10b`

A method is a params class (a FrozenModel whose `name` defaults to the method's name) plus a `build` function that
adds the delta modules to the backbone, registered with `register_method` (the pattern of the compression methods,
cpmant/compress/methods/base.py). `apply_delta` builds it, runs one dummy forward where the method sizes its modules
lazily (adapters, bitfit), and freezes everything but the delta (`freeze_module(exclude=["deltas"],
set_state_dict=True)`): `model.state_dict()` then returns the delta only.

Registered: `lora` (CPM-Ant's recipe: project_q and project_v, r 8, alpha 16), `adapter`, `low_rank_adapter`,
`compacter`, `bitfit` (OpenDelta adds a bias after each chosen module: our Linears have none), and `full` (plain
full fine-tuning, the baseline; no OpenDelta). OpenDelta's `prefix` and `soft_prompt` are not offered: prefix
tuning only knows transformers' own attention classes, and soft prompts rewrite an `input_ids` / `attention_mask`
forward signature that CPMAnt (input, length, context, position, segment, span) does not have.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from pydantic import Field, ValidationError
from torch import nn

from ..configio import FrozenModel
from ..errors import CpmantError, a_or_an


class DeltaParams(FrozenModel):
    """Base of every method's params; `name` is the registered method name."""

    name: str = Field(..., description="registered method name")

    def summary(self) -> str:
        return self.name


class LoraParams(DeltaParams):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="rank")
    alpha: int = Field(16, ge=1, description="scaling numerator (scaling = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    modules: tuple[str, ...] = Field(("project_q", "project_v"), description="Linear module names (name tails)")

    def summary(self) -> str:
        return f"lora r={self.r} alpha={self.alpha} on {','.join(self.modules)}"


class AdapterParams(DeltaParams):
    name: Literal["adapter"] = "adapter"
    bottleneck_dim: int = Field(24, ge=1)
    non_linearity: str = "gelu_new"
    modules: tuple[str, ...] = Field(("self_attention", "ffn.ffn"),
                                     description="modules whose output goes through an adapter")


class LowRankAdapterParams(DeltaParams):
    name: Literal["low_rank_adapter"] = "low_rank_adapter"
    reduction_factor: int = Field(32, ge=1)
    low_rank_rank: int = Field(1, ge=1)
    non_linearity: str = "gelu_new"
    modules: tuple[str, ...] = ("self_attention", "ffn.ffn")


class CompacterParams(DeltaParams):
    name: Literal["compacter"] = "compacter"
    reduction_factor: int = Field(16, ge=1)
    hypercomplex_division: int = Field(4, ge=1)
    non_linearity: str = "gelu_new"
    modules: tuple[str, ...] = ("self_attention", "ffn.ffn")


class BitFitParams(DeltaParams):
    name: Literal["bitfit"] = "bitfit"
    modules: tuple[str, ...] = Field(
        ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out"),
        description="modules that get a trainable bias on their output")


class FullParams(DeltaParams):
    name: Literal["full"] = "full"


@dataclass(frozen=True)
class Method:
    name: str
    params_cls: type[DeltaParams]
    build: Callable[[nn.Module, DeltaParams], Any]  # -> an OpenDelta DeltaBase, or None (full)
    default_lr: float  # peak lr without --sweep-lr (tune.lr.<method> overrides it)
    lr_grid: tuple[float, ...]  # the lrs --sweep-lr tries (at most 3; tune.lr_grid.<method> overrides it)
    lazy: bool  # sizes its modules on a forward pass (run once before freezing / loading)
    mergeable: bool  # merge_delta folds it into the plain weights
    description: str


METHODS: dict[str, Method] = {}
MAX_LR_GRID = 3  # lrs one --sweep-lr tries per method: each is a whole tuning run


def register_method(name: str, params_cls: type[DeltaParams], default_lr: float,
                    lr_grid: tuple[float, ...] = (), lazy: bool = False, mergeable: bool = False,
                    description: str = ""):
    """Decorator: register `build(model, params) -> DeltaBase | None` under `name`; `lr_grid` (at most
    MAX_LR_GRID values, default: default_lr alone) is what `--sweep-lr` tries."""
    default_name = params_cls.model_fields["name"].default
    if default_name != name:
        raise ValueError(f"{params_cls.__name__}.name must default to {name!r}, not {default_name!r}")
    grid = tuple(float(x) for x in (lr_grid or (default_lr,)))
    if len(grid) > MAX_LR_GRID:
        raise ValueError(f"{name}: an lr grid has at most {MAX_LR_GRID} values, got {len(grid)}")

    def deco(build):
        METHODS[name] = Method(name, params_cls, build, float(default_lr), grid, lazy, mergeable,
                               description or (build.__doc__ or "").strip())
        return build

    return deco


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CpmantError(f"unknown delta method {name!r}", f"choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_params(method: str, params: dict | DeltaParams | None = None) -> DeltaParams:
    """The validated params of `method` (its defaults updated by `params`); bad fields are one CpmantError."""
    m = get_method(method)
    if isinstance(params, DeltaParams):
        if params.name != method:
            raise CpmantError(f"params for {params.name!r} given to method {method!r}", "pass the method's own params")
        return params
    data = {k: v for k, v in (params or {}).items() if k != "name"}
    try:
        return m.params_cls(name=method, **data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise CpmantError(f"bad params for delta method {method!r}: {problems}",
                          f"fields of {method}: {', '.join(k for k in m.params_cls.model_fields if k != 'name')}"
                          ) from None


@contextlib.contextmanager
def _quiet():
    """OpenDelta prints a line per modified module and warns about dummy inputs: keep the console readable."""
    log = logging.getLogger("opendelta")
    old = log.level
    log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            log.setLevel(old)


def _opendelta():
    with _quiet():
        import opendelta  # noqa: F401  (its import prints deprecation warnings of its dependencies)
    return opendelta


def dummy_inputs(model: nn.Module, length: int = 4) -> dict[str, torch.Tensor]:
    """A one-row batch for CPMAnt.forward: what OpenDelta's lazily sized modules need to see once."""
    p = next(model.parameters())
    dev = p.device
    L = max(length, int(getattr(model, "prompt_length", 0)) + 2)
    z = torch.zeros(1, L, dtype=torch.int32, device=dev)
    return {"input": torch.full((1, L), 1, dtype=torch.int32, device=dev),
            "length": torch.tensor([L], dtype=torch.int32, device=dev),
            "context": torch.ones(1, L, dtype=torch.bool, device=dev),
            "position": torch.arange(L, dtype=torch.int32, device=dev)[None], "segment": z, "span": z}


# ---- the methods -------------------------------------------------------------------------------------
# lora's and full's defaults: the valid-split sweep on a pretrained tiny base (demo-c3: lora 1e-3 67.0, 3e-3 71.5,
# 1e-2 71.0; full 1e-3 70.5, 3e-3 74.5, 1e-2 72.5; demo-ccpm stayed at chance for every lr); docs/delta-tuning.md
@register_method("lora", LoraParams, default_lr=1e-3, lr_grid=(1e-3, 3e-3, 1e-2), mergeable=True,
                 description="LoRA (OpenDelta LoraModel) on project_q/project_v, r 8, alpha 16 (CPM-Ant)")
def _lora(model, p: LoraParams):
    with _quiet():
        return _lora_class()(backbone_model=model, lora_r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                             modified_modules=list(p.modules))


_LORA_CLASS = None


def _lora_class():
    """OpenDelta's LoraModel, sizing each LoRA from `dim_in` / `dim_out` where a module has no `in_features`
    (the int8 `QuantLinear` of compressed variants) and creating float LoRA weights beside an int8 weight (its
    own `new_module_like` would make them int8)."""
    global _LORA_CLASS
    if _LORA_CLASS is None:
        from opendelta import LoraModel
        from opendelta.delta_models.lora import LowRankLinear

        class CpmLoraModel(LoraModel):
            def new_module_like(self, child_module):
                w = child_module.weight
                like = w if w.is_floating_point() else torch.empty(0, device=w.device,
                                                                   dtype=torch.get_default_dtype())
                new = LowRankLinear(in_features=getattr(child_module, "in_features", None) or child_module.dim_in,
                                    out_features=getattr(child_module, "out_features", None) or child_module.dim_out,
                                    weight=like, r=self.lora_r, lora_alpha=self.lora_alpha,
                                    lora_dropout=self.lora_dropout)
                self.delta_modules.append(new)
                return new

        _LORA_CLASS = CpmLoraModel
    return _LORA_CLASS


@register_method("adapter", AdapterParams, default_lr=1e-3, lr_grid=(3e-4, 1e-3, 3e-3), lazy=True,
                 description="bottleneck adapters (OpenDelta AdapterModel) after attention and FFN")
def _adapter(model, p: AdapterParams):
    with _quiet():
        from opendelta import AdapterModel

        return AdapterModel(backbone_model=model, bottleneck_dim=p.bottleneck_dim, non_linearity=p.non_linearity,
                            modified_modules=list(p.modules))


@register_method("low_rank_adapter", LowRankAdapterParams, default_lr=1e-3, lr_grid=(3e-4, 1e-3, 3e-3),
                 lazy=True,
                 description="low-rank adapters (OpenDelta LowRankAdapterModel)")
def _low_rank_adapter(model, p: LowRankAdapterParams):
    with _quiet():
        from opendelta import LowRankAdapterModel

        return LowRankAdapterModel(backbone_model=model, reduction_factor=p.reduction_factor,
                                   low_rank_rank=p.low_rank_rank, non_linearity=p.non_linearity,
                                   modified_modules=list(p.modules))


@register_method("compacter", CompacterParams, default_lr=1e-3, lr_grid=(3e-4, 1e-3, 3e-3), lazy=True,
                 description="Compacter (OpenDelta CompacterModel): hypercomplex adapters")
def _compacter(model, p: CompacterParams):
    with _quiet():
        from opendelta import CompacterModel

        return CompacterModel(backbone_model=model, reduction_factor=p.reduction_factor,
                              hypercomplex_division=p.hypercomplex_division, non_linearity=p.non_linearity,
                              modified_modules=list(p.modules))


@register_method("bitfit", BitFitParams, default_lr=3e-3, lr_grid=(1e-3, 3e-3, 1e-2), lazy=True,
                 description="BitFit (OpenDelta BitFitModel): a trainable bias after each Linear")
def _bitfit(model, p: BitFitParams):
    with _quiet():
        from opendelta import BitFitModel

        return BitFitModel(backbone_model=model, modified_modules=list(p.modules))


# full: CPM-Ant's Linear keeps N(0,1) weights and divides by sqrt(d_in), so an AdamW step of lr moves a weight's
# effect ~sqrt(d_in) times less than in a standard parameterisation: its grid sits an order above the deltas'
@register_method("full", FullParams, default_lr=3e-3, lr_grid=(1e-3, 3e-3, 1e-2),
                 description="full fine-tuning (every weight; the baseline)")
def _full(model, p: FullParams):
    return None


# ---- applying a method ---------------------------------------------------------------------------------
@dataclass
class DeltaHandle:
    """A model with a method applied: `model` is the backbone (modified in place), `delta` OpenDelta's object
    (None for `full`)."""

    method: str
    params: DeltaParams
    model: nn.Module
    delta: Any = field(default=None, repr=False)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The delta's tensors (every weight for `full`), named as in the composed model."""
        return {n: p.detach() for n, p in self.trainable()}

    @property
    def num_trainable(self) -> int:
        return trainable_parameters(self.model)


def apply_delta(model: nn.Module, method: str, params: dict | DeltaParams | None = None) -> DeltaHandle:
    """Add `method`'s delta modules to `model` (in place) and freeze everything else; `full` leaves it all trainable.

    Works on a model built on the meta device too (the delta is then on meta, for counting)."""
    m = get_method(method)
    p = method_params(method, params)
    if m.name == "full":
        for q in model.parameters():
            q.requires_grad_(True)
        return DeltaHandle(method, p, model, None)
    if getattr(model, "_cpmant_delta", None):
        raise CpmantError(f"the model already carries {a_or_an(model._cpmant_delta)} delta",
                          "apply one delta method to a freshly loaded base model")
    _opendelta()
    if m.lazy:
        model.dummy_inputs = dummy_inputs(model)  # OpenDelta's pseudo-data pass reads this attribute
    with _quiet():
        try:
            delta = m.build(model, p)
        except (AssertionError, AttributeError, RuntimeError, TypeError, ValueError) as e:  # OpenDelta asserts sizes
            raise CpmantError(f"delta method {method!r} cannot be applied to this model: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}",
                              "choose another method or other `modules`") from None
        if m.lazy:  # modules sized on their first forward (BitFit's BiasLayer) exist after this one
            was = model.training
            model.eval()
            with torch.no_grad():
                model(**model.dummy_inputs)
            model.train(was)
            delta.mark_as_delta()
        delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    n = trainable_parameters(model)
    if n == 0:
        raise CpmantError(f"delta method {method!r} matched no module of this model",
                          f"its `modules` ({', '.join(getattr(p, 'modules', ()))}) must name modules of CPMAnt, "
                          "e.g. project_q, project_v, self_attention, ffn.ffn")
    model._cpmant_delta = method
    return DeltaHandle(method, p, model, delta)


def trainable_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def total_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
