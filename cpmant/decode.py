"""The one-token decoding step with the fewest tensor operations (`CPMAnt.inference` takes it for one new token per
row with a precomputed bias).

Decoding small models is bound by the cost per operation, not by arithmetic, so the step writes the encoder's
modules out on (B, D) rows and issues about a third of their operations. How each sub-block (a layer's attention,
its FFN) is computed is a `Step`, worked out once per generation (`step_plan`, kept on the cache):

- `Plain`: unwrapped float Linears; their weights used directly: q/k/v (w_0/w_1) share one input scaled by
  1/sqrt(dim_in), the residual add and the output scale are one addmm;
- `Int8`: unwrapped QuantLinears; q/k/v (w_0/w_1) are one fused int8 matmul (`cpmant.modules.quant.fused_forward`);
- `FloatCopies`: matrices under the int8 kernel's size threshold (float or int8): their float copies with the
  scales folded in, stacked and taken once per generation, so that q/k/v (w_0/w_1) are one mm;
- `Modules`: anything else (MoE, a delta wrapping project_q/project_v, a hook): the modules are called as modules,
  so they compute what they always do.
A model whose encoder or layers are not the plain classes, or are wrapped (a memory-budget scheduler, a hook), gets
no fused plan: its modules run as modules. fp32 or one dtype throughout (autocast takes the module path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (Attention, DenseGatedACT, Encoder, FeedForward, KVCache, Linear, RMSNorm, TransformerBlock,
                     plain_forward)
from .modules.quant import QuantLinear, fused_forward, kernel_min_weights, small_float_weight


# ---- the kinds of step: how a sub-block's matrices are multiplied ---------------------------------------------------
class Step:
    """How the step computes a sub-block (a layer's attention or FFN). This base calls the modules as modules; each
    kind below overrides what it computes more directly."""

    def copies(self, first: tuple[nn.Module, ...], second: nn.Module) -> "Step":
        """This step, or one that multiplies float copies of small matrices (taken once per generation)."""
        return self

    def attention_in(self, a: Attention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (B, D) -> q, k, v
        return a.project_q(x), a.project_k(x), a.project_v(x)

    def attention_out(self, a: Attention, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:  # h + out(o)
        return h + a.attention_out(o)

    def ffn(self, f: nn.Module, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # h + ffn(x)
        return h + f(x)


class Modules(Step):
    """Anything that is not plain (MoE, a delta wrapping a Linear, a hook): the modules as modules."""


class Plain(Step):
    """Unwrapped float Linears of one input size: their weights used directly."""

    def copies(self, first, second):
        if sum(m.weight.numel() for m in first) + second.weight.numel() >= kernel_min_weights():
            return self  # large: no copy of large weights
        return FloatCopies(torch.cat([m.weight * m.scale for m in first]), second.weight * second.scale)

    def attention_in(self, a, x):
        xs = x * a.project_q.scale
        return tuple(torch.mm(xs, m.weight.t()) for m in (a.project_q, a.project_k, a.project_v))

    def attention_out(self, a, h, o):
        return torch.addmm(h, o, a.attention_out.weight.t(), alpha=a.attention_out.scale)

    def ffn(self, f, h, x):
        xs = x * f.w_in.w_0.scale
        g = F.gelu(torch.mm(xs, f.w_in.w_0.weight.t())).mul_(torch.mm(xs, f.w_in.w_1.weight.t()))
        return torch.addmm(h, g, f.w_out.weight.t(), alpha=f.w_out.scale)


class Int8(Step):
    """Unwrapped QuantLinears of one input size: q/k/v (w_0/w_1) as one fused int8 matmul."""

    def copies(self, first, second):
        """Matrices too small for the kernel (within int8_kernel()): their cached float copies."""
        dev = first[0].weight.device
        w1 = small_float_weight(first, torch.empty(0, first[0].dim_in, device=dev))
        w2 = small_float_weight((second,), torch.empty(0, second.dim_in, device=dev))
        return FloatCopies(w1, w2) if w1 is not None and w2 is not None else self

    def attention_in(self, a, x):
        return fused_forward((a.project_q, a.project_k, a.project_v), x)

    def ffn(self, f, h, x):
        a, b = fused_forward((f.w_in.w_0, f.w_in.w_1), x)
        return h + f.w_out(F.gelu(a).mul_(b))


@dataclass(frozen=True, eq=False)
class FloatCopies(Step):
    """Small matrices as float copies, scales folded in: `first` the first matrices stacked by rows (q/k/v or
    w_0/w_1), `second` the output matrix (attention_out or w_out)."""

    first: torch.Tensor
    second: torch.Tensor

    def attention_in(self, a, x):
        return torch.mm(x, self.first.t()).split(a.num_heads * a.dim_head, dim=-1)

    def attention_out(self, a, h, o):
        return torch.addmm(h, o, self.second.t())

    def ffn(self, f, h, x):
        a, b = torch.mm(x, self.first.t()).chunk(2, dim=-1)
        return torch.addmm(h, F.gelu(a).mul_(b), self.second.t())


MODULES, PLAIN, INT8 = Modules(), Plain(), Int8()
_KINDS = ((Linear, PLAIN), (QuantLinear, INT8))


# ---- the plan: one Step per sub-block, once per generation ---------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    attention: Step
    ffn: Step


@dataclass(frozen=True, eq=False)
class StepPlan:
    """For `model`: whether the fused step applies (`fused`), and each layer's plan."""

    model: nn.Module
    fused: bool
    layers: tuple[LayerPlan, ...] = ()


def _kind(*lins: nn.Module) -> Step:
    """PLAIN when every one is an unwrapped Linear, INT8 when every one is an unwrapped QuantLinear (all of one input
    size), else MODULES."""
    for cls, kind in _KINDS:
        if all(type(m) is cls for m in lins) and plain_forward(*lins) and len({m.dim_in for m in lins}) == 1:
            return kind
    return MODULES


def _attention_kind(block) -> Step:
    a = block.self_attention
    first = (a.project_q, a.project_k, a.project_v)
    if plain_forward(block, a) and _kind(a.attention_out) is _kind(*first):
        return _kind(*first)
    return MODULES


def _ffn_kind(block) -> Step:
    f = block.ffn
    if (type(f) is FeedForward and type(f.w_in) is DenseGatedACT and plain_forward(block, f, f.w_in)
            and _kind(f.w_out) is _kind(f.w_in.w_0, f.w_in.w_1)):
        return _kind(f.w_in.w_0, f.w_in.w_1)
    return MODULES


def layer_plan(layer: TransformerBlock) -> LayerPlan:
    """How the step computes the layer's attention and FFN. A hook on a layer's norm may bind its weights at each
    step (memory-budget streaming hooks the first norm): then the weights are read at each step, never copied once
    for the generation."""
    att = ffn = MODULES
    norms = [b for b in (layer.self_att and layer.self_att.layernorm_before_attention,
                         layer.ffn and layer.ffn.layernorm_before_ffn) if b is not None]
    copies = plain_forward(*norms)
    if layer.self_att is not None:
        att = _attention_kind(layer.self_att)
        if copies:
            a = layer.self_att.self_attention
            att = att.copies((a.project_q, a.project_k, a.project_v), a.attention_out)
    if layer.ffn is not None:
        ffn = _ffn_kind(layer.ffn)
        if copies:
            f = layer.ffn.ffn
            ffn = ffn.copies((f.w_in.w_0, f.w_in.w_1), f.w_out)
    return LayerPlan(att, ffn)


def step_plan(model: nn.Module, cache: KVCache) -> StepPlan:
    """The plan of `model`'s one-token step, worked out at the first step of a generation and kept on its cache."""
    got = cache.step_plan
    if got is not None and got.model is model:
        return got
    layers = model.encoder.layers
    fused = (type(model.encoder) is Encoder and plain_forward(model.encoder, layers)
             and all(type(layer) is TransformerBlock and plain_forward(layer) for layer in layers))
    plan = StepPlan(model, fused, tuple(layer_plan(layer) for layer in layers) if fused else ())
    cache.step_plan = plan
    return plan


# ---- the step ------------------------------------------------------------------------------------------------------
def one_token(model: nn.Module, plan: StepPlan, input: torch.Tensor, segment: torch.Tensor, cache: KVCache,
              bias: torch.Tensor) -> torch.Tensor:
    """One new token per row: input (B, 1), segment (B,), bias (H, B, 1, T) -> logits (B, 1, V) fp32; the keys and
    values go straight into the cache. The same function as the model's modules."""
    h = (F.embedding(input[:, 0], model.input_embedding.weight)
         + F.embedding(segment, model.segment_embedding.weight)) * (1.0 / math.sqrt(model.config.dim_model))
    for i, (layer, lp) in enumerate(zip(model.encoder.layers, plan.layers)):
        if layer.self_att is not None:
            h = _attention(layer.self_att, h, bias, cache, i, lp.attention)
        if layer.ffn is not None:
            h = lp.ffn.ffn(layer.ffn.ffn, h, _rms(layer.ffn.layernorm_before_ffn, h))
    cache.advance(1)
    h = _rms(model.encoder.output_layernorm, h)
    return model.input_embedding.projection(h[:, None]).float()


def _rms(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or not plain_forward(norm):
        return norm(x)
    # F.rms_norm issues about twenty operations on the CPU; these are five
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _attention(block, h: torch.Tensor, bias: torch.Tensor, cache: KVCache, i: int, step: Step) -> torch.Tensor:
    a = block.self_attention
    B = h.size(0)
    H, Dh = a.num_heads, a.dim_head
    q, k, v = step.attention_in(a, _rms(block.layernorm_before_attention, h))
    k, v = cache.write(i, k.view(B, H, 1, Dh).transpose(0, 1), v.view(B, H, 1, Dh).transpose(0, 1))
    T = k.size(2)
    q = q.view(B, H, Dh).transpose(0, 1).reshape(H * B, 1, Dh)
    s = torch.baddbmm(bias.reshape(H * B, 1, T), q, k.reshape(H * B, T, Dh).transpose(1, 2),
                      alpha=1.0 / math.sqrt(Dh))
    o = torch.bmm(s.softmax(-1), v.reshape(H * B, T, Dh))  # (H*B, 1, Dh)
    return step.attention_out(a, h, o.view(H, B, Dh).transpose(0, 1).reshape(B, H * Dh))
