"""Int8 weights: `QuantLinear` stores an int8 weight (dim_out, dim_in) and an fp32 per-output-channel scale.

Symmetric per row: scale = max|w_row| / 127. It computes CPM-Live's scaling: y = x @ (weight * scale[:, None]).T /
sqrt(dim_in). A saved int8 model's state dict holds `...weight` (int8) and `...weight_scale` (fp32) for each encoder
Linear; that format is all that is stored.

The matmul: inside `int8_kernel()` (the generation engine enters it for every decoding step), on the CPU and with no
gradient wanted, it runs torch's dynamic quantized linear
(`torch.ops.quantized.linear_dynamic`, fbgemm): the int8 weight with its per-row scales (1/sqrt(dim_in) folded in)
is prepacked once, at the first call after load or after the weight changed (the pack is a cache, never saved), and
each call quantizes the activations per tensor to uint8 and multiplies int8 x int8 -> int32. The activation
quantization moves outputs by about 1% of their largest magnitude against the dequantized weight (measured 0.6-1%
with the full 8-bit range, which needs VNNI; without VNNI fbgemm needs `reduce_range`, 7 bits, about 2%).
Elsewhere (plain forwards: training, scoring, perplexity; CUDA; a gradient through the input; a torch without the
quantized ops) the weight is dequantized per call: weight-only int8, exactly the stored model.
QAT: `enable_qat(model)` swaps the encoder's Linear modules for `QATLinear`, which shares the same Parameter and
uses `fake_quant_int8(weight)` (round to the int8 grid, straight-through gradient) in every forward, train and eval,
so the model computes what its int8 version will; state-dict keys and optimizer references are unchanged.
`disable_qat(model)` swaps them back.

Measured per call against fp32 F.linear (1 thread, AMD EPYC with VNNI, loaded machine): 512x1536 at
1 row 34 vs 89 us, at 8 rows 82 vs 320 us; 128x128 at 1 row about 20 vs 5 us (the fixed cost of quantizing the
activations wins only on larger matrices). So matrices under KERNEL_MIN_WEIGHTS multiply in fp32 from a float copy
made once (a cache like the packs; `drop_packs` forgets both).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
import weakref
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Linear
from ..precision import _cpu_flags

QMAX = 127


# A CPU that multiplies u8 x s8 without int16 saturation (AVX512-VNNI / AVX-VNNI) lets fbgemm use the activations'
# full 8-bit range (reduce_range False); the flags are read once, by cpmant.precision.
_REDUCE_RANGE = not ({"avx512_vnni", "avx_vnni"} & _cpu_flags())
# Below this many weights a matrix is multiplied in fp32 from a float copy made once (a cache, like the packs): the
# kernel's fixed cost per call (quantizing the activations) loses to fp32 on small matrices (measured 1 row: 128x384
# 16 vs 5.5 us, 512x512 16 vs 23 us; 8 rows: 128x384 19 vs 17 us, 512x512 25 vs 74 us), and such a copy costs little.
KERNEL_MIN_WEIGHTS = 1 << 17  # the default of int8_kernel(min_weights=...)
_KERNEL_OK = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


# While the kernel is on: the size under which a matrix multiplies from a float copy; None while it is off.
_KERNEL_ON: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("cpmant_int8_kernel", default=None)


@contextlib.contextmanager
def int8_kernel(enabled: bool = True, min_weights: Optional[int] = None) -> Iterator[None]:
    """Within it, QuantLinear multiplies through the int8 kernel where it can (see the module docstring); matrices
    (or fused groups) of fewer than `min_weights` weights multiply in fp32 from a float copy made once (default: the
    enclosing int8_kernel's, else KERNEL_MIN_WEIGHTS; 0 sends every matrix through the kernel)."""
    if min_weights is None:
        min_weights = kernel_min_weights()
    token = _KERNEL_ON.set(min_weights if enabled else None)
    try:
        yield
    finally:
        _KERNEL_ON.reset(token)


def kernel_min_weights() -> int:
    """The size under which matrices multiply from float copies, here (the enclosing int8_kernel's, else the
    default); the fused one-token step (cpmant.decode) stacks float matrices under it too."""
    got = _KERNEL_ON.get()
    return KERNEL_MIN_WEIGHTS if got is None else got


def use_int8_kernel(x: torch.Tensor) -> bool:
    """Whether QuantLinear computes x with the int8 kernel: inside int8_kernel(), on the CPU with fbgemm present,
    no gradient through x."""
    return (_KERNEL_ON.get() is not None and _KERNEL_OK and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled()))


def encoder_linears(model: nn.Module, cls: type = Linear) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) of every `cls` module under model.encoder."""
    out = []
    for parent in model.encoder.modules():
        for name, child in parent.named_children():
            if isinstance(child, cls):
                out.append((parent, name, child))
    return out


def int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per row): symmetric, scale = max|row| / 127 (1 for an all-zero row)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class QuantLinear(nn.Module):
    """Linear with int8 weight (dim_out, dim_in) and fp32 per-row scale; y = x @ (W_q * s).T / sqrt(dim_in)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        self.scale = 1.0 / math.sqrt(dim_in)
        self.register_buffer("weight", torch.zeros(dim_out, dim_in, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(dim_out, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: Linear) -> "QuantLinear":
        """The int8 version of a float Linear (its weights rounded to the per-row grid)."""
        with torch.device(linear.weight.device):
            q = cls(linear.dim_in, linear.dim_out)
        q.weight, q.weight_scale = int8_per_row(linear.weight)
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this module computes with (without the 1/sqrt(dim_in))."""
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def _key(self) -> tuple:
        w, s = self.weight, self.weight_scale
        try:
            versions = (w._version, s._version)
        except RuntimeError:  # inference tensors keep no version counter (they cannot be changed in place later)
            versions = (None, None)
        return (w.data_ptr(), s.data_ptr(), *versions)

    def packed(self, rows: Optional[slice] = None, cols: Optional[slice] = None):
        """The fbgemm prepacked weight (per-row int8, scales weight_scale / sqrt(dim_in)), or of its rows / columns
        `rows` / `cols` (an MoE expert's part); cached until the weight or its scales change (another tensor, or an
        in-place write)."""
        key = self._key()
        packs = self.__dict__.setdefault("_packed", {})
        part = (None if rows is None else (rows.start, rows.stop), None if cols is None else (cols.start, cols.stop))
        cached = packs.get(part)
        if cached is not None and cached[0] == key:
            return cached[1]
        w, scales = self.weight.detach(), self.weight_scale.detach()
        if rows is not None:
            w, scales = w[rows], scales[rows]
        if cols is not None:
            w = w[:, cols]
        pack = _prepack(w, scales.double() * self.scale)
        if any(v[0] != key for v in packs.values()):
            packs.clear()
        packs[part] = (key, pack)
        return pack

    def forward_part(self, x: torch.Tensor, rows: Optional[slice] = None, cols: Optional[slice] = None):
        """x (N, len(cols) or dim_in) times the weight's rows / columns (an MoE expert), scaled as forward."""
        if use_int8_kernel(x):
            x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
            return torch.ops.quantized.linear_dynamic(x2, self.packed(rows, cols), _REDUCE_RANGE).to(x.dtype)
        w, s = self.weight, self.weight_scale
        if rows is not None:
            w, s = w[rows], s[rows]
        if cols is not None:
            w = w[:, cols]
        return F.linear(x, w.to(x.dtype) * (s.float() * self.scale).to(x.dtype)[:, None])

    def __getstate__(self):  # the packs are a cache (ScriptObjects): copies and pickles go without them
        state = self.__dict__.copy()
        for key in ("_packed", "_fused", "_float"):
            state.pop(key, None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim_in) -> (..., dim_out)
        if use_int8_kernel(x) and self.weight.numel() < kernel_min_weights():
            return F.linear(x, _float_copy((self,), x.dtype))
        if use_int8_kernel(x):
            x2 = x.reshape(-1, self.dim_in)
            if x2.dtype != torch.float32 or not x2.is_contiguous():
                x2 = x2.float().contiguous()
            y = torch.ops.quantized.linear_dynamic(x2, self.packed(), _REDUCE_RANGE)
            return y.view(*x.shape[:-1], self.dim_out).to(x.dtype)
        # the 1/sqrt(dim_in) folded into the per-row scale: one (dim_out, dim_in) dequantized weight per call
        w = self.weight.to(x.dtype) * (self.weight_scale.float() * self.scale).to(x.dtype)[:, None]
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}, int8"


def swap_in_quant_linears(model: nn.Module, from_weights: bool) -> int:
    """Replace every encoder `Linear` by a `QuantLinear` (from its weights, or empty to load a state dict into)."""
    n = 0
    for parent, name, lin in encoder_linears(model):
        if from_weights:
            new = QuantLinear.from_linear(lin)
        else:
            with torch.device(lin.weight.device):
                new = QuantLinear(lin.dim_in, lin.dim_out)
        setattr(parent, name, new)
        n += 1
    return n


def fused_forward(lins: tuple["QuantLinear", ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(lin(x) for lin in lins) for QuantLinears of one input size (q/k/v, w_0/w_1): through the int8 kernel, one
    matmul over their rows stacked (one activation quantization and one call instead of several; the pack is cached
    on the first of them until any of their weights change), else one call each."""
    if not use_int8_kernel(x):
        return tuple(lin(x) for lin in lins)
    first = lins[0]
    if sum(lin.weight.numel() for lin in lins) < kernel_min_weights():
        y = F.linear(x, _float_copy(lins, x.dtype))
        return tuple(y.split([lin.dim_out for lin in lins], dim=-1))
    key = tuple(lin._key() for lin in lins) + tuple(id(lin) for lin in lins)
    cached = first.__dict__.get("_fused")
    if cached is None or cached[0] != key:
        w = torch.cat([lin.weight.detach() for lin in lins])
        scales = torch.cat([lin.weight_scale.detach().double() * lin.scale for lin in lins])
        cached = first.__dict__["_fused"] = (key, _prepack(w, scales))
    x2 = x.reshape(-1, first.dim_in)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.ops.quantized.linear_dynamic(x2, cached[1], _REDUCE_RANGE).to(x.dtype)
    return tuple(t.view(*x.shape[:-1], t.size(-1)) for t in y.split([lin.dim_out for lin in lins], dim=-1))


def small_float_weight(lins: tuple["QuantLinear", ...], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Inside int8_kernel(), for matrices too small for the kernel: their cached float copy (rows stacked, each row
    scaled by its 1/sqrt(dim_in)), so that y = x @ w.T; else None (use the modules or fused_forward)."""
    if use_int8_kernel(x) and sum(lin.weight.numel() for lin in lins) < kernel_min_weights():
        return _float_copy(lins, x.dtype)
    return None


def _float_copy(lins: tuple["QuantLinear", ...], dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weights of lins stacked by rows, each scaled by its 1/sqrt(dim_in): made once and cached on
    the first of them until any of their weights change (for matrices below KERNEL_MIN_WEIGHTS)."""
    caches = lins[0].__dict__.setdefault("_float", {})  # one per group this module heads: (q,) and (q, k, v)
    group = (len(lins), dtype)
    key = tuple(lin._key() for lin in lins) + tuple(id(lin) for lin in lins)
    cached = caches.get(group)
    if cached is None or cached[0] != key:
        w = torch.cat([lin.weight.float() * (lin.weight_scale.float() * lin.scale)[:, None] for lin in lins])
        cached = caches[group] = (key, w.to(dtype))
    return cached[1]


# ---- the tied output projection of an int8 model, while decoding -------------------------------------------------
# One int8 pack of the input embedding table per Embedding module (the tied output layer): made at the first
# decoding step after load (or after the table changed), kept beside the module, not on it, so that copies, pickles
# and state dicts never carry it; `drop_packs` forgets it.
_TABLES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _tensor_key(t: torch.Tensor) -> tuple:
    try:
        return (t.data_ptr(), t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return (t.data_ptr(), None)


def _prepack(w: torch.Tensor, scales: torch.Tensor):
    """fbgemm's prepacked per-row int8 weight: w (N, K) int8, scales (N,) float64 (what y = x @ (w * s).T uses)."""
    with warnings.catch_warnings():  # torch marks quantized tensor creation as deprecated: the pack needs one
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(w.cpu().contiguous(), scales.cpu(),
                                                     torch.zeros(w.size(0), dtype=torch.long), 0)
        prev = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "fbgemm"
            return torch.ops.quantized.linear_prepack(q, None)
        finally:
            torch.backends.quantized.engine = prev


def table_pack(embedding: nn.Module):
    """The int8 per-row pack of `embedding.weight` (V, D) with 1/sqrt(D) folded into its scales, so that
    linear_dynamic(h, pack) = embedding.projection(h) up to int8 rounding; made once per table and cached."""
    key = _tensor_key(embedding.weight)
    cached = _TABLES.get(embedding)
    if cached is None or cached[0] != key:
        q, scale = int8_per_row(embedding.weight)
        cached = _TABLES[embedding] = (key, _prepack(q, scale.double() / math.sqrt(embedding.dim)))
    return cached[1]


def table_logits(embedding: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """h (B, D) fp32 -> logits (B, V) fp32 through the table's int8 pack (the tied output projection of an int8
    model while decoding: a quarter of the fp32 table's bytes read per token). Numerics: the table rounded to its
    per-row int8 grid and the activations quantized per tensor, as every QuantLinear in the kernel."""
    return torch.ops.quantized.linear_dynamic(h.contiguous(), table_pack(embedding), _REDUCE_RANGE)


# ---- fp32 weights packed for oneDNN, while decoding -------------------------------------------------------------
# At one row torch's fp32 mm reads the weights at 14-22 GB/s; oneDNN's linear over a weight reordered once into its
# blocked layout reads them at 39-45 GB/s on this machine's 2 threads (measured: 4608 x 512, 1 row, 529 vs 207 us; 8
# rows 793 vs 423 us). The fused one-token step (cpmant.decode) keeps such packs of its large fp32 matrices: one per
# group (q/k/v stacked, w_0/w_1 stacked, the output matrices, the tied table), made once per model, kept beside the
# modules (never saved, copied or pickled) until a weight changes; `drop_packs` forgets them.
_FP32_OK = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_FP32_PACKS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def fp32_pack(owner: nn.Module, tag: str, weights: tuple[torch.Tensor, ...], make) -> torch.Tensor:
    """The oneDNN pack of `make()` (an fp32 (N, K) matrix built from `weights`, scales folded in), cached on
    `owner` under `tag` until any of `weights` changes (another tensor, or an in-place write)."""
    key = tuple(_tensor_key(w) for w in weights)
    packs = _FP32_PACKS.setdefault(owner, {})
    cached = packs.get(tag)
    if cached is None or cached[0] != key:
        cached = packs[tag] = (key, torch.ops.mkldnn._reorder_linear_weight(make().contiguous(), 1))
    return cached[1]


def packed_linear(x: torch.Tensor, pack: torch.Tensor) -> torch.Tensor:
    """x (B, K) fp32 @ the packed (N, K) matrix's transpose -> (B, N): oneDNN's linear."""
    return torch.ops.mkldnn._linear_pointwise(x, pack, None, "none", [None], "")


def drop_packs(module: nn.Module) -> int:
    """Forget the int8 kernel's packed weights cached under `module` (they are copies of the int8 weights): a
    scheduler that streams a layer out calls it so that the layer's memory really goes. Returns how many went."""
    n = 0
    for m in module.modules():
        for key in ("_packed", "_fused", "_float"):
            if m.__dict__.pop(key, None) is not None:
                n += 1
        for cache in (_TABLES, _FP32_PACKS):
            if cache.pop(m, None) is not None:
                n += 1
    return n


# ---- quantization-aware training (distill with qat: true) ---------------------------------------------------------
def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """w rounded to its per-row symmetric int8 grid in the forward; identity gradient (straight-through)."""
    scale = (w.detach().abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(torch.finfo(w.dtype).tiny)
    q = torch.round(w.detach() / scale).clamp(-QMAX, QMAX) * scale
    return w + (q - w).detach()


class QATLinear(Linear):
    """A Linear computing with fake_quant_int8(weight); shares the Parameter of the Linear it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant_int8(self.weight) * self.scale)


def _swap_class(model: nn.Module, src: type, dst: type) -> int:
    """Replace every encoder module of exactly type `src` by a `dst` that shares its weight Parameter."""
    n = 0
    for parent, name, old in encoder_linears(model, src):
        if type(old) is not src:
            continue
        with torch.device("meta"):
            new = dst(old.dim_in, old.dim_out)
        new.weight = old.weight
        setattr(parent, name, new)
        n += 1
    return n


def enable_qat(model: nn.Module) -> int:
    """Swap the encoder's Linears for QATLinear (same Parameter objects); returns how many were swapped."""
    return _swap_class(model, Linear, QATLinear)


def disable_qat(model: nn.Module) -> int:
    """Undo enable_qat; returns how many modules were swapped back."""
    return _swap_class(model, QATLinear, Linear)
