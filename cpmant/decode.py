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
An int8 model's step also projects onto the vocabulary through an int8 pack of the tied embedding table
(`StepPlan.int8_head`): the logits move by int8 rounding (measured in tests/test_engine.py); the prompt's logits
(the first new token) keep the fp32 table.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (Attention, DenseGatedACT, Encoder, FeedForward, KVCache, Linear, RMSNorm, TransformerBlock,
                     plain_forward)
from .modules import quant
from .modules.quant import (QuantLinear, fp32_pack, fused_forward, kernel_min_weights, packed_linear,
                            small_float_weight, table_logits, use_int8_kernel)

# Whether a float model's large matrices (and its tied table) multiply through oneDNN packs made once per model
# (`Packed`, `StepPlan.packed_head`): a second copy of those weights, so only for fp32 models of at most
# PACK_MAX_BYTES of weights and never under a memory-budget plan (cpmant.offload does not count the copies); and
# only from PACK_MIN_BYTES up (weights beyond a last-level cache: the tiny preset, 7.5 MB, decoded 10% slower with
# its table packed, 1,750 vs 1,930 tokens/s; d512-l8, 126 MB, 2.2x faster). Under PACK_MIN_BYTES a float model's
# large matrices are stacked into float copies once per generation instead (`FloatCopies`: one mm for q/k/v and one
# for w_0/w_1, scales folded in; at most PACK_MIN_BYTES more memory), which saves the tiny preset's step operations.
PACK_MIN_BYTES, PACK_MAX_BYTES = 32 << 20, 1 << 30


@dataclass(frozen=True)
class DecodeOptions:
    """What the one-token step may use beyond the modules' own math: an int8 model's int8 copy of the tied table
    (`int8_head`, StepPlan.int8_head) and a float model's oneDNN packs (`pack_fp32`, above). Both on by default;
    `decode_options(int8_head=False, pack_fp32=False)` decodes with the modules' own fp32 projections (the
    reference the tests compare with)."""

    int8_head: bool = True
    pack_fp32: bool = True
    pack_min_bytes: int = PACK_MIN_BYTES  # below it, float copies instead of packs (0: pack any size)


_OPTIONS: contextvars.ContextVar[DecodeOptions] = contextvars.ContextVar("cpmant_decode_options",
                                                                         default=DecodeOptions())


@contextlib.contextmanager
def decode_options(**changes):
    """Within the block, generation decodes with DecodeOptions(**changes) (this thread and its context only)."""
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **changes))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


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
        return FloatCopies.of(first, second)

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

    @classmethod
    def of(cls, first: tuple[nn.Module, ...], second: nn.Module) -> "FloatCopies":
        """Copies of float Linears `first` (stacked) and `second`, their scales folded in."""
        return cls(torch.cat([m.weight * m.scale for m in first]), second.weight * second.scale)

    def attention_in(self, a, x):
        return torch.mm(x, self.first.t()).split(a.num_heads * a.dim_head, dim=-1)

    def attention_out(self, a, h, o):
        return torch.addmm(h, o, self.second.t())

    def ffn(self, f, h, x):
        a, b = torch.mm(x, self.first.t()).chunk(2, dim=-1)
        return torch.addmm(h, F.gelu(a).mul_(b), self.second.t())


@dataclass(frozen=True, eq=False)
class Packed(Step):
    """Large fp32 matrices as oneDNN packs (cpmant.modules.quant.fp32_pack), scales folded in, made once per model:
    `first` q/k/v (w_0/w_1) stacked by rows, `second` the output matrix. oneDNN's batch-1 linear reads the weights at
    about twice the speed of torch's mm (the pack is a second copy of them); the sums run in another order, so the
    outputs move by float rounding (the engine tests compare with the module path at 1e-4)."""

    first: torch.Tensor
    second: torch.Tensor

    @classmethod
    def of(cls, first: tuple[nn.Module, ...], second: nn.Module) -> "Packed":
        ws = tuple(m.weight for m in first)
        return cls(fp32_pack(first[0], "first", ws, lambda: torch.cat([m.weight * m.scale for m in first])),
                   fp32_pack(second, "second", (second.weight,), lambda: second.weight * second.scale))

    def attention_in(self, a, x):
        return packed_linear(x, self.first).split(a.num_heads * a.dim_head, dim=-1)

    def attention_out(self, a, h, o):
        return packed_linear(o, self.second).add_(h)

    def ffn(self, f, h, x):
        a, b = packed_linear(x, self.first).chunk(2, dim=-1)
        return packed_linear(F.gelu(a).mul_(b), self.second).add_(h)


MODULES, PLAIN, INT8 = Modules(), Plain(), Int8()
_KINDS = ((Linear, PLAIN), (QuantLinear, INT8))


# ---- the plan: one Step per sub-block, once per generation ---------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    attention: Step
    ffn: Step


@dataclass(frozen=True, eq=False)
class StepPlan:
    """For `model`: whether the fused step applies (`fused`), each layer's plan, and whether the output projection
    multiplies an int8 copy of the tied table (`int8_head`, see `_int8_head`)."""

    model: nn.Module
    fused: bool
    layers: tuple[LayerPlan, ...] = ()
    int8_head: bool = False
    packed_head: Optional[torch.Tensor] = None  # the tied table's oneDNN pack (1/sqrt(D) folded in), see DecodeOptions.pack_fp32


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
    k = _kind(*first)
    return k if plain_forward(block, a) and _kind(a.attention_out) is k else MODULES


def _ffn_kind(block) -> Step:
    f = block.ffn
    if not (type(f) is FeedForward and type(f.w_in) is DenseGatedACT and plain_forward(block, f, f.w_in)):
        return MODULES
    k = _kind(f.w_in.w_0, f.w_in.w_1)
    return k if _kind(f.w_out) is k else MODULES


def layer_plan(layer: TransformerBlock, pack: Optional[str] = None) -> LayerPlan:
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
            if att is PLAIN and pack is not None:
                att = _large((a.project_q, a.project_k, a.project_v), a.attention_out, pack)
    if layer.ffn is not None:
        ffn = _ffn_kind(layer.ffn)
        if copies:
            f = layer.ffn.ffn
            ffn = ffn.copies((f.w_in.w_0, f.w_in.w_1), f.w_out)
            if ffn is PLAIN and pack is not None:
                ffn = _large((f.w_in.w_0, f.w_in.w_1), f.w_out, pack)
    return LayerPlan(att, ffn)


def step_plan(model: nn.Module, cache: KVCache) -> StepPlan:
    """The plan of `model`'s one-token step, worked out at the first step of a generation and kept on its cache."""
    got = cache.step_plan
    if got is not None and got.model is model:
        return got
    layers = model.encoder.layers
    fused = (type(model.encoder) is Encoder and plain_forward(model.encoder, layers)
             and all(type(layer) is TransformerBlock and plain_forward(layer) for layer in layers))
    pack = _fp32_mode(model) if fused else None
    int8_head = fused and _int8_head(model)
    plan = StepPlan(model, fused, tuple(layer_plan(layer, pack) for layer in layers) if fused else (),
                    int8_head, _packed_head(model, int8_head) if pack == "packed" else None)
    cache.step_plan = plan
    return plan


def _fp32_mode(model: nn.Module) -> Optional[str]:
    """How a float model's large matrices multiply (DecodeOptions.pack_fp32; fp32 weights on the CPU, no memory-budget plan,
    outside autograd): "copies" under PACK_MIN_BYTES of weights, "packed" (oneDNN present) up to PACK_MAX_BYTES;
    else None (their own weights, torch's mm)."""
    w = model.input_embedding.weight
    if not (_OPTIONS.get().pack_fp32 and getattr(model, "offload", None) is None and w.device.type == "cpu"
            and w.dtype == torch.float32 and not torch.is_grad_enabled()):
        return None
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size < _OPTIONS.get().pack_min_bytes:
        return "copies"
    return "packed" if quant._FP32_OK and size <= PACK_MAX_BYTES else None


def _large(first: tuple[nn.Module, ...], second: nn.Module, pack: str) -> Step:
    """The step for large float matrices: oneDNN packs ("packed") or float copies ("copies")."""
    if pack == "packed":
        return Packed.of(first, second)
    return FloatCopies.of(first, second)


def _packed_head(model: nn.Module, int8_head: bool) -> Optional[torch.Tensor]:
    """The tied table's oneDNN pack when the output projection would multiply the fp32 table (not `int8_head`), of
    at least kernel_min_weights() weights; else None."""
    emb = model.input_embedding
    if int8_head or not plain_forward(emb) or emb.weight.numel() < kernel_min_weights():
        return None
    return fp32_pack(emb, "table", (emb.weight,), lambda: emb.weight / math.sqrt(emb.dim))


def _int8_head(model: nn.Module) -> bool:
    """An int8 model (QuantLinears in its encoder) decoding inside int8_kernel(), with an fp32 unhooked table of at
    least kernel_min_weights() weights and no memory-budget plan (cpmant.offload does not count the table's pack):
    its output projection multiplies the table's int8 pack (`cpmant.modules.quant.table_logits`), made once per
    model. The fp32 table is 37% of the bytes an int8 d512-l8 model reads per token; the pack a quarter of that."""
    emb = model.input_embedding
    return (_OPTIONS.get().int8_head and getattr(model, "offload", None) is None and plain_forward(emb)
            and emb.weight.dtype == torch.float32 and use_int8_kernel(emb.weight)
            and emb.weight.numel() >= kernel_min_weights()
            and any(type(m) is QuantLinear for m in model.encoder.modules()))


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
    if plan.int8_head:
        return table_logits(model.input_embedding, h)[:, None]
    if plan.packed_head is not None:
        return packed_linear(h, plan.packed_head)[:, None]
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
    if B == 1:  # (1, H * Dh) is already head-major: views without the transposes (fewer operations per token)
        k, v = cache.write(i, k.view(H, 1, 1, Dh), v.view(H, 1, 1, Dh))
        q = q.view(H, 1, Dh)
    else:
        k, v = cache.write(i, k.view(B, H, 1, Dh).transpose(0, 1), v.view(B, H, 1, Dh).transpose(0, 1))
        q = q.view(B, H, Dh).transpose(0, 1).reshape(H * B, 1, Dh)
    T = k.size(2)
    s = torch.baddbmm(bias.reshape(H * B, 1, T), q, k.reshape(H * B, T, Dh).transpose(1, 2),
                      alpha=1.0 / math.sqrt(Dh))
    o = torch.bmm(s.softmax(-1), v.reshape(H * B, T, Dh))  # (H*B, 1, Dh)
    o = o.view(1, H * Dh) if B == 1 else o.view(H, B, Dh).transpose(0, 1).reshape(B, H * Dh)
    return step.attention_out(a, h, o)
