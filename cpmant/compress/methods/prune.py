"""Structured pruning, the recipe method `prune`: keep shares of the parent's sub-layers, heads and FFN width, picked
by importance on held-out rows, then slice the weights away.

The order is the published ladder's (CPM-ANT.md): whole sub-layers first, then heads and FFN width measured on the
model without the removed sub-layers. `slice_model` makes a new, physically smaller model:

- a removed sub-block is marked in `mask_modules` (no weights, residual only);
- a kept head keeps its dim_head rows of project_q/k/v and its columns of attention_out; a kept neuron its rows of
  w_0/w_1 and its column of w_out;
- our Linear divides by sqrt(dim_in), so when attention_out's input (H*Dh) or w_out's (dim_ff) shrinks the kept
  weights are multiplied by sqrt(new_in / old_in): the function computed by the kept units is unchanged;
- the position-bias table is shared by all layers and has one column per head slot. Its new columns are the heads
  kept most often over the layers (`align_heads`), and each layer's kept heads are ordered so that those heads sit
  in their own column. When every layer keeps the same heads this is exact; otherwise a head kept in some layers
  but not voted into the table inherits the column of a dropped head (the distillation that follows adapts it).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import torch
from pydantic import Field

from ...config import ModelConfig
from ...errors import CpmantError
from ...factory import build_model
from ...model import CPMAnt
from ...training.data import Batch
from ..importance import lm_loss, sublayer_importance, taylor_importance
from .base import MethodConfig, MethodContext, register_method


class PruneConfig(MethodConfig):
    name: Literal["prune"] = "prune"
    att_keep: float = Field(1.0, gt=0, le=1, description="share of attention sub-layers kept")
    ffn_keep: float = Field(1.0, gt=0, le=1, description="share of FFN sub-layers kept")
    heads_keep: float = Field(1.0, gt=0, le=1, description="share of attention heads kept")
    dim_ff_keep: float = Field(1.0, gt=0, le=1, description="share of FFN width kept")

    def check_order(self, names: list[str], index: int) -> str | None:
        late = [n for n in names[:index] if n in ("quantize", "moefy")]
        if late:
            return f"prune needs a dense fp model: put it before {', '.join(late)}"
        return None

    def summary(self) -> str:
        return ""  # the shape is in the description already

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


@register_method("prune", PruneConfig, uses=("importance_rows", "batch_size"))
def apply(ctx: MethodContext, cfg: PruneConfig):
    """Structured pruning of sub-layers, heads and FFN neurons by importance (shares of the parent's shape)."""
    student, ctx.report["prune"] = prune(ctx.student, cfg.target_shape(ctx.teacher.config), ctx.importance_batches(),
                                         precision=ctx.precision)
    return student


# ---- the algorithm -------------------------------------------------------------------------------------------------
def _refuse_compressed(model: CPMAnt, what: str) -> None:
    c = model.config
    if c.quantization is not None or c.moe_experts is not None:
        raise CpmantError(f"{what} needs a dense fp model, this one has quantization={c.quantization!r}, "
                          f"moe_experts={c.moe_experts!r}",
                          "prune before quantize / moefy (recipe methods: prune, distill, quantize, moefy)")


def present(model: CPMAnt) -> tuple[list[int], list[int]]:
    """(layers with attention, layers with FFN)."""
    layers = model.encoder.layers
    return ([i for i, l in enumerate(layers) if l.self_att is not None],
            [i for i, l in enumerate(layers) if l.ffn is not None])


def align_heads(heads: list[list[int]], keep_att: set[int], num_heads: int) -> tuple[list[int], list[list[int]]]:
    """(old head of each position-bias column, each layer's kept heads ordered to match those columns).

    Columns go to the heads kept by the most layers (ties: lower index); a layer's head that owns a column is placed
    at that column, its other kept heads fill the free slots in increasing order. Layers not in keep_att get [].
    """
    sizes = {len(heads[i]) for i in keep_att}
    if len(sizes) > 1:
        raise CpmantError(f"kept attention layers keep different head counts {sorted(sizes)}",
                          "keep the same number of heads in every layer (num_heads is one number)")
    n = sizes.pop() if sizes else num_heads
    votes = Counter(h for i in keep_att for h in heads[i])
    bias = sorted(range(num_heads), key=lambda h: (-votes[h], h))[:n]
    ordered: list[list[int]] = []
    for i in range(len(heads)):
        if i not in keep_att:
            ordered.append([])
            continue
        slots: list[int | None] = [h if h in heads[i] else None for h in bias]
        rest = iter(sorted(set(heads[i]) - set(bias)))
        ordered.append([s if s is not None else next(rest) for s in slots])
    return bias, ordered


def _rows(dim_head: int, heads: list[int]) -> torch.Tensor:
    return torch.tensor([h * dim_head + d for h in heads for d in range(dim_head)], dtype=torch.long)


@torch.no_grad()
def slice_model(model: CPMAnt, keep_att: set[int], keep_ffn: set[int], heads: list[list[int]] | None = None,
                neurons: list[list[int]] | None = None) -> CPMAnt:
    """A new model with only the kept sub-blocks, heads (per layer) and neurons (per layer); the input is untouched.

    heads[i] / neurons[i] list the kept units of layer i (the same count in every kept layer); None keeps all.
    Entries of layers that are not kept are ignored. See the module doc for the rescaling and the bias columns.
    """
    _refuse_compressed(model, "slice_model")
    c = model.config
    L, H, Dh, F = c.num_layers, c.num_heads, c.dim_head, c.dim_ff
    has_att, has_ffn = present(model)
    keep_att, keep_ffn = set(keep_att), set(keep_ffn)
    bad = sorted(keep_att - set(has_att)) + sorted(keep_ffn - set(has_ffn))
    if bad:
        raise CpmantError(f"cannot keep sub-blocks that are absent or out of range (layers {bad})",
                          f"keep attention from {has_att} and FFN from {has_ffn}")
    heads = [list(range(H))] * L if heads is None else [list(h) for h in heads]
    neurons = [list(range(F))] * L if neurons is None else [list(n) for n in neurons]
    if len(heads) != L or len(neurons) != L:
        raise CpmantError(f"heads / neurons need one list per layer ({L})", "pass [] for layers that are not kept")
    for i in keep_att:
        if len(set(heads[i])) != len(heads[i]) or not heads[i] or not all(0 <= h < H for h in heads[i]):
            raise CpmantError(f"layer {i}: bad head list {heads[i]}", f"give distinct heads in [0, {H})")
    f_sizes = {len(neurons[i]) for i in keep_ffn}
    if len(f_sizes) > 1:
        raise CpmantError(f"kept FFN layers keep different widths {sorted(f_sizes)}", "keep the same dim_ff everywhere")
    for i in keep_ffn:
        if len(set(neurons[i])) != len(neurons[i]) or not neurons[i] or not all(0 <= j < F for j in neurons[i]):
            raise CpmantError(f"layer {i}: bad neuron list", f"give distinct neurons in [0, {F})")
    bias_heads, heads = align_heads(heads, keep_att, H)
    H2 = len(bias_heads)
    F2 = f_sizes.pop() if f_sizes else F
    mask = tuple((i not in keep_att, i not in keep_ffn) for i in range(L))
    config = c.replace(num_heads=H2, dim_ff=F2, mask_modules=mask if any(a or f for a, f in mask) else None)

    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith("encoder.layers."):
            out[k] = v.clone()
    out["position_bias.relative_attention_bias"] = sd["position_bias.relative_attention_bias"][:, bias_heads].clone()
    att_scale = (H2 / H) ** 0.5  # sqrt(new_in / old_in) of attention_out
    ffn_scale = (F2 / F) ** 0.5  # of w_out
    for i in range(L):
        p = f"encoder.layers.{i}."
        if i in keep_att:
            a = p + "self_att.self_attention."
            rows = _rows(Dh, heads[i]).to(sd[a + "project_q.weight"].device)
            norm = p + "self_att.layernorm_before_attention.weight"
            out[norm] = sd[norm].clone()
            for n in ("q", "k", "v"):
                out[a + f"project_{n}.weight"] = sd[a + f"project_{n}.weight"].index_select(0, rows)
            w = sd[a + "attention_out.weight"]
            out[a + "attention_out.weight"] = (w.index_select(1, rows).float() * att_scale).to(w.dtype)
        if i in keep_ffn:
            f = p + "ffn.ffn."
            idx = torch.tensor(neurons[i], dtype=torch.long, device=sd[f + "w_out.weight"].device)
            norm = p + "ffn.layernorm_before_ffn.weight"
            out[norm] = sd[norm].clone()
            for n in ("w_in.w_0", "w_in.w_1"):
                out[f + f"{n}.weight"] = sd[f + f"{n}.weight"].index_select(0, idx)
            w = sd[f + "w_out.weight"]
            out[f + "w_out.weight"] = (w.index_select(1, idx).float() * ffn_scale).to(w.dtype)

    new = build_model(config, device="meta")  # no random init of weights that are overwritten
    new.load_state_dict(out, strict=True, assign=True)
    return new.train(model.training)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in increasing index order (ties: lower index)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def prune(model: CPMAnt, target: dict, batches: list[Batch], precision: str = "fp32") -> tuple[CPMAnt, dict]:
    """Prune to `target` = {att_layers, ffn_layers, num_heads, dim_ff} (Recipe.target_shape) by importance.

    1. sub-layers: ablation importance; keep the `att_layers` / `ffn_layers` most important (at least one each);
    2. heads and neurons: Taylor importance on the model with those sub-layers removed; keep the top `num_heads`
       heads of each kept attention layer and the top `dim_ff` neurons of each kept FFN;
    3. slice. Returns (pruned model, report): kept_att, kept_ffn, heads (per layer, the kept heads in their new
       order, [] where the attention is removed), bias_heads, loss_before, loss_after, params_before, params_after,
       and sublayer_importance when sub-layers were removed. `precision` (resolved: fp32 / bf16): the autocast of
       every importance and loss forward pass.
    """
    _refuse_compressed(model, "prune")
    c = model.config
    has_att, has_ffn = present(model)
    n_att = max(1, min(int(target["att_layers"]), len(has_att)))
    n_ffn = max(1, min(int(target["ffn_layers"]), len(has_ffn)))
    n_heads, n_ff = int(target["num_heads"]), int(target["dim_ff"])
    if not (1 <= n_heads <= c.num_heads and 1 <= n_ff <= c.dim_ff):
        raise CpmantError(f"target num_heads={n_heads}, dim_ff={n_ff} do not fit the model "
                          f"(num_heads={c.num_heads}, dim_ff={c.dim_ff})", "prune to at most the current sizes")
    loss_before = lm_loss(model, batches, precision)
    report: dict = {"loss_before": loss_before, "params_before": model.num_parameters()}

    keep_att, keep_ffn = set(has_att), set(has_ffn)
    if n_att < len(has_att) or n_ffn < len(has_ffn):
        imp = sublayer_importance(model, batches, precision)
        report["sublayer_importance"] = [list(p) for p in imp]
        keep_att = set(sorted(has_att, key=lambda i: (-imp[i][0], i))[:n_att])
        keep_ffn = set(sorted(has_ffn, key=lambda i: (-imp[i][1], i))[:n_ffn])
        model = slice_model(model, keep_att, keep_ffn)  # importance below is measured without them

    heads = [list(range(c.num_heads)) for _ in range(c.num_layers)]
    neurons = [list(range(c.dim_ff)) for _ in range(c.num_layers)]
    if n_heads < c.num_heads or n_ff < c.dim_ff:
        h_imp, f_imp = taylor_importance(model, batches, heads=n_heads < c.num_heads, neurons=n_ff < c.dim_ff,
                                         precision=precision)
        if h_imp is not None:
            heads = [_top(h_imp[i], n_heads) if i in keep_att else [] for i in range(c.num_layers)]
        if f_imp is not None:
            neurons = [_top(f_imp[i], n_ff) if i in keep_ffn else [] for i in range(c.num_layers)]
    bias_heads, ordered = align_heads(heads, keep_att, c.num_heads)
    pruned = slice_model(model, keep_att, keep_ffn, ordered, neurons)
    report.update(
        kept_att=sorted(keep_att), kept_ffn=sorted(keep_ffn),
        heads=ordered, bias_heads=bias_heads,
        loss_after=lm_loss(pruned, batches, precision), params_after=pruned.num_parameters(),
    )
    return pruned, report
