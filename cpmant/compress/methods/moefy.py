"""MoEfication, the recipe method `moefy` (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are
Mixtures of Experts"; BMCook).

Each kept FFN's dim_ff neurons are split into `num_experts` equal groups; per token a router keeps the `top_k`
groups and the others contribute nothing. No weight is retrained: the FFN is the same function when top_k equals
num_experts, and a sparse kernel would skip a share 1 - top_k / num_experts of the FFN's FLOPs otherwise.

Choices made here:
- clustering (default `cluster="activation"`, co-activation): on held-out tokens (at most `max_tokens`, sampled at
  valid positions) each neuron's feature is the magnitude |gelu(w_0 x) * (w_1 x)| of its gated activation over the
  tokens, centred and L2-normalised (so similarity is the correlation of magnitudes); balanced k-means splits the
  neurons into equal groups of neurons that are large on the same tokens. `cluster="weight"` is MoEfication's
  parameter clustering instead (balanced k-means on the L2-normalised w_0 rows); it needs no data.
- the MoE module (`cpmant.modules.moe.MoEFeedForward`) lives with the model; `cpmant.factory.build_model` rebuilds a
  saved MoE model from its config. This module only converts a dense model.
- router: the centroid of each expert, the mean of its w_0 rows (dim_model space), stored as a buffer
  `encoder.layers.{i}.ffn.ffn.router.weight` (num_experts, dim_model). A token's score for an expert is its normed
  FFN input . centroid (a rescaled mean of the expert's pre-GELU activations); the top_k highest are kept.
- implementation: dense. All neurons are computed and the unselected experts' activations are zeroed before
  w_out (correct on any device; the saving is reported, not realised, on CPU). Neurons are permuted so that expert e
  owns the contiguous block [e * dim_ff / E, (e + 1) * dim_ff / E) of w_0/w_1 rows and w_out columns.
Works on int8 models too (their QuantLinear rows and scales are permuted alike).
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from ...errors import CpmantError
from ...layers import FeedForward
from ...model import CPMAnt
from ...modules.moe import MoEFeedForward
from ...training.data import Batch
from ..importance import _device, eval_mode, lm_loss
from .base import MethodConfig, MethodContext, register_method


class MoefyConfig(MethodConfig):
    name: Literal["moefy"] = "moefy"
    num_experts: int = Field(8, ge=2, description="experts per FFN")
    top_k: int = Field(2, ge=1, description="experts used per token")
    cluster: Literal["activation", "weight"] = Field("activation", description="neuron clustering")
    max_tokens: int = Field(2048, ge=1, description="held-out tokens sampled for activation clustering")

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError("top_k must not exceed num_experts")
        return self

    def summary(self) -> str:
        return f"MoE {self.num_experts} experts, top {self.top_k}"


@register_method("moefy", MoefyConfig, uses=("importance_rows", "batch_size"),
                 description="MoEfication: FFN neurons clustered into experts, top-k routing")
def apply(ctx: MethodContext, cfg: MoefyConfig):
    student, ctx.report["moefy"] = moefy(ctx.student, ctx.importance_batches(), cfg.num_experts, cfg.top_k,
                                         cluster=cfg.cluster, max_tokens=cfg.max_tokens, precision=ctx.precision)
    return student


# ---- clustering -------------------------------------------------------------------------------------
def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Labels (N,) putting exactly N / k rows of x (N, d) in each of k clusters.

    Lloyd iterations whose assignment step is greedy under capacity: rows in order of their distance to the
    nearest centre each take the closest cluster that still has room.
    """
    n = x.size(0)
    if n % k:
        raise CpmantError(f"{n} neurons cannot form {k} equal experts", "choose num_experts dividing dim_ff")
    cap = n // k
    x = x.double()
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=g)[:k]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        d = torch.cdist(x, centers).numpy()  # (n, k)
        pref = np.argsort(d, axis=1, kind="stable")  # each row's clusters, closest first
        new = np.full(n, -1, dtype=np.int64)
        room = np.full(k, cap, dtype=np.int64)
        for r in np.argsort(d.min(axis=1), kind="stable"):  # rows closest to a centre choose first
            for c in pref[r]:
                if room[c] > 0:
                    new[r], room[c] = c, room[c] - 1
                    break
        new_t = torch.from_numpy(new)
        if torch.equal(new_t, labels):
            break
        labels = new_t
        centers = torch.stack([x[labels == c].mean(0) for c in range(k)])
    return labels


@torch.no_grad()
def _activation_samples(model: CPMAnt, batches: list[Batch], max_tokens: int, seed: int) -> dict[int, torch.Tensor]:
    """Per FFN layer: the gated activation (N, dim_ff) at up to max_tokens sampled valid positions."""
    dev = _device(model)
    store: dict[int, list[torch.Tensor]] = {}
    valid_rows: list[torch.Tensor] = []
    hooks = []

    def grab(i):
        def post(module, args, out):
            store.setdefault(i, []).append(out.detach().float().flatten(0, 1)[valid_rows[-1]].cpu())
        return post

    for i, layer in enumerate(model.encoder.layers):
        if layer.ffn is not None:
            hooks.append(layer.ffn.ffn.w_in.register_forward_hook(grab(i)))
    try:
        with eval_mode(model):
            for b in batches:
                L = b.input.size(1)
                valid_rows.append((torch.arange(L)[None, :] < b.length[:, None]).flatten().nonzero().squeeze(1).to(dev))
                model(**{k: v.to(dev) for k, v in b.model_inputs().items()})
    finally:
        for h in hooks:
            h.remove()
    out = {i: torch.cat(v) for i, v in store.items()}
    n = next(iter(out.values())).size(0) if out else 0
    if n > max_tokens:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_tokens]
        out = {i: v[pick] for i, v in out.items()}
    return out


def _weight(lin: nn.Module) -> torch.Tensor:
    """The float weight a Linear / QuantLinear computes with (without the 1/sqrt(dim_in))."""
    return lin.dequantized() if hasattr(lin, "weight_scale") else lin.weight.detach().float()


@torch.no_grad()
def _permute(ffn: FeedForward, perm: torch.Tensor) -> None:
    """Reorder the neurons: rows of w_0 / w_1 (and their int8 scales), columns of w_out."""
    for lin in (ffn.w_in.w_0, ffn.w_in.w_1):
        lin.weight.data = lin.weight.data.index_select(0, perm.to(lin.weight.device))
        if hasattr(lin, "weight_scale"):
            lin.weight_scale = lin.weight_scale.index_select(0, perm.to(lin.weight.device))
    w = ffn.w_out.weight
    w.data = w.data.index_select(1, perm.to(w.device))


def moefy(model: CPMAnt, batches: list[Batch], num_experts: int, top_k: int, *, cluster: str = "activation",
          max_tokens: int = 2048, iters: int = 20, seed: int = 0, precision: str = "fp32") -> tuple[CPMAnt, dict]:
    """A new model whose kept FFNs are `num_experts`-expert MoE layers using `top_k` per token; (model, report).
    `precision` (resolved) is that of the reported losses; the activations that cluster the neurons stay fp32."""
    c = model.config
    if c.moe_experts is not None:
        raise CpmantError("the model is already MoEfied", "moefy a dense model")
    if cluster not in ("activation", "weight"):
        raise CpmantError(f"unknown cluster method {cluster!r}", "use 'activation' or 'weight'")
    if c.dim_ff % num_experts or not 1 <= top_k <= num_experts:
        raise CpmantError(f"cannot split dim_ff={c.dim_ff} into {num_experts} experts with top_k={top_k}",
                          "choose num_experts dividing dim_ff and 1 <= top_k <= num_experts")
    loss_before = lm_loss(model, batches, precision)
    new = copy.deepcopy(model)
    acts = _activation_samples(new, batches, max_tokens, seed) if cluster == "activation" else {}
    for i, layer in enumerate(new.encoder.layers):
        if layer.ffn is None:
            continue
        ffn = layer.ffn.ffn
        if cluster == "activation":
            feat = acts[i].abs().t()  # (F, N): each neuron's magnitude over the sampled tokens
            feat = feat - feat.mean(1, keepdim=True)
        else:
            feat = _weight(ffn.w_in.w_0)  # (F, D)
        feat = feat / feat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        labels = balanced_kmeans(feat, num_experts, iters=iters, seed=seed + i)
        perm = torch.argsort(labels, stable=True)
        _permute(ffn, perm)
        centroids = _weight(ffn.w_in.w_0).view(num_experts, c.dim_ff // num_experts, -1).mean(1)  # (E, D)
        layer.ffn.ffn = MoEFeedForward.from_ffn(ffn, num_experts, top_k, centroids)
    new.config = c.replace(moe_experts=num_experts, moe_top_k=top_k)
    loss_after = lm_loss(new, batches, precision)
    return new, {
        "num_experts": num_experts, "top_k": top_k, "cluster": cluster,
        "ffn_compute_saved": 1.0 - top_k / num_experts,
        "loss_before": loss_before, "loss_after": loss_after, "loss_change": loss_after - loss_before,
    }
