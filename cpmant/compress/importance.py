"""Importance scores of sub-layers, heads and FFN neurons, measured on held-out batches.

- `sublayer_importance`: ablation. Each attention / FFN sub-block is removed in turn (the block slot set to None, as a
  masked sub-block is, and put back in a `finally`); its score is the LM loss increase. Nothing is copied.
- `head_importance`, `neuron_importance`: first-order Taylor scores through gates (Michel et al. 2019 for heads,
  Molchanov et al. 2017 for units). A gate of ones with requires_grad multiplies each head's context output (the
  input of attention_out) and each neuron of the gated activation (the input of w_out), through forward hooks that
  are removed afterwards; model.py is untouched. d loss / d gate = sum over tokens of grad(unit output) . unit output,
  so per batch the score is |that sum|, and the scores of all batches are added (then divided by the number of
  target tokens, so that they do not grow with the amount of data). A unit whose output is identically zero scores 0.
  Rows of layers whose sub-block is masked (absent) are NaN.

Losses are token-mean cross entropy over the targets (`IGNORE` positions skipped), in eval mode (no dropout).
Every function takes `precision` (resolved: fp32 / bf16): the autocast of the forward passes (the scores, the
cross-entropy and the gate gradients' accumulation stay fp32).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..errors import CpmantError
from ..model import CPMAnt
from ..training.data import Batch
from ..training.evaluate import loss_sums


def _device(model: CPMAnt) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode inside the block, the previous mode after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _sum_ce(model: CPMAnt, batch: Batch, device, precision: str = "fp32") -> tuple[torch.Tensor, int]:
    """(summed token CE over the targets, number of targets) for one batch; grad follows the caller's mode."""
    total, _ = loss_sums(model, batch, precision)  # the loss of training and evaluation (logits at targets only)
    return total, batch.num_targets


def _check(batches: list[Batch]) -> None:
    if not batches or sum(b.num_targets for b in batches) == 0:
        raise CpmantError("importance needs held-out batches with at least one target token",
                          "pass a non-empty list of Batch (e.g. PretrainStream.batch rows the model did not train on)")


@torch.no_grad()
def lm_loss(model: CPMAnt, batches: list[Batch], precision: str = "fp32") -> float:
    """Mean token cross entropy over the targets of `batches` (eval mode, no grad)."""
    _check(batches)
    dev = _device(model)
    total, n = 0.0, 0
    with eval_mode(model):
        for b in batches:
            s, k = _sum_ce(model, b, dev, precision)
            total, n = total + float(s), n + k
    return total / n


@contextmanager
def removed(model: CPMAnt, layer: int, kind: str):
    """Temporarily remove one sub-block ('att' or 'ffn') of `layer`: the model behaves as if it were masked."""
    block = model.encoder.layers[layer]
    attr = {"att": "self_att", "ffn": "ffn"}[kind]
    saved = getattr(block, attr)
    setattr(block, attr, None)
    try:
        yield model
    finally:
        setattr(block, attr, saved)


def sublayer_importance(model: CPMAnt, batches: list[Batch],
                        precision: str = "fp32") -> list[tuple[float | None, float | None]]:
    """Per layer (loss increase without its attention, loss increase without its FFN); None where already masked."""
    base = lm_loss(model, batches, precision)
    out = []
    for i, layer in enumerate(model.encoder.layers):
        pair = []
        for kind, present in (("att", layer.self_att is not None), ("ffn", layer.ffn is not None)):
            if not present:
                pair.append(None)
                continue
            with removed(model, i, kind):
                pair.append(lm_loss(model, batches, precision) - base)
        out.append((pair[0], pair[1]))
    return out


def taylor_importance(model: CPMAnt, batches: list[Batch], heads: bool = True, neurons: bool = True,
                      precision: str = "fp32") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Head (num_layers, num_heads) and neuron (num_layers, dim_ff) Taylor scores in one pass over `batches`.

    NaN rows for masked sub-blocks. Gradients go to the gates only (torch.autograd.grad): no parameter .grad is
    written, so this is safe in the middle of training.
    """
    _check(batches)
    c = model.config
    dev = _device(model)
    layers = model.encoder.layers
    head_gates: dict[int, torch.Tensor] = {}
    ff_gates: dict[int, torch.Tensor] = {}
    hooks = []

    def head_hook(gate, H, Dh):
        def pre(module, args):  # attention_out input (B, L, H*Dh): scale each head's Dh block by its gate
            (o,) = args
            g = gate.to(o.dtype).repeat_interleave(Dh)  # (H*Dh,)
            return (o * g,)
        return pre

    def ff_hook(gate):
        def post(module, args, out):  # w_in output (B, L, F): the gated activation, one gate per neuron
            return out * gate.to(out.dtype)
        return post

    try:
        for i, layer in enumerate(layers):
            if heads and layer.self_att is not None:
                att = layer.self_att.self_attention
                g = torch.ones(att.num_heads, device=dev, requires_grad=True)
                head_gates[i] = g
                hooks.append(att.attention_out.register_forward_pre_hook(head_hook(g, att.num_heads, att.dim_head)))
            if neurons and layer.ffn is not None:
                w_out = layer.ffn.ffn.w_out
                g = torch.ones(w_out.dim_in, device=dev, requires_grad=True)
                ff_gates[i] = g
                hooks.append(layer.ffn.ffn.w_in.register_forward_hook(ff_hook(g)))
        gates = list(head_gates.values()) + list(ff_gates.values())
        acc = [torch.zeros_like(g) for g in gates]
        n = 0
        if gates:
            with eval_mode(model), torch.enable_grad():
                for b in batches:
                    loss, k = _sum_ce(model, b, dev, precision)
                    n += k
                    for a, gr in zip(acc, torch.autograd.grad(loss, gates, allow_unused=True)):
                        if gr is not None:
                            a += gr.abs()
    finally:
        for h in hooks:
            h.remove()

    def table(sel: dict[int, torch.Tensor], width: int, offset: int) -> torch.Tensor:
        t = torch.full((len(layers), width), math.nan)
        for j, i in enumerate(sel):
            t[i] = acc[offset + j].detach().cpu() / max(n, 1)
        return t

    h = table(head_gates, c.num_heads, 0) if heads else None
    f = table(ff_gates, c.dim_ff, len(head_gates)) if neurons else None
    return h, f


def head_importance(model: CPMAnt, batches: list[Batch], precision: str = "fp32") -> torch.Tensor:
    """(num_layers, num_heads) Taylor importance of each head; NaN rows for masked attention sub-blocks."""
    return taylor_importance(model, batches, heads=True, neurons=False, precision=precision)[0]


def neuron_importance(model: CPMAnt, batches: list[Batch], precision: str = "fp32") -> torch.Tensor:
    """(num_layers, dim_ff) Taylor importance of each FFN neuron; NaN rows for masked FFN sub-blocks."""
    return taylor_importance(model, batches, heads=False, neurons=True, precision=precision)[1]
