"""Streaming layers into a model: the hooks (LayerStreamer) and the two sources (the mapped file on the CPU, a ring of
two GPU buffers fed from pinned memory on CUDA)."""

from __future__ import annotations

import concurrent.futures
from typing import Optional

import torch
from torch import nn

from ..errors import CpmantError
from ..modules.quant import drop_packs
from .mapped import _MappedFile
from .plan import OffloadPlan


# ---- binding tensors into modules --------------------------------------------------------------------------
def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    return model.get_submodule(mod_name), attr


def _assign(module: nn.Module, attr: str, t: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(t, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = t
    else:
        raise CpmantError(f"the checkpoint has a tensor {attr!r} that {type(module).__name__} does not hold",
                          "use the config.json saved with these weights")


class LayerStreamer:
    """Hooks that bind a streamed layer's weights when the layer starts, prefetch the next streamed layer, and
    release the previous one.

    The hooks sit on the first module every path through a layer calls: its first RMSNorm (the module forward and
    the generation engine's one-token step, `cpmant.decode.one_token`, which skips the TransformerBlock's own forward
    but calls a hooked norm as a module); the layer bound before is released there, and the last one at the
    encoder's output norm. A hooked norm costs the one-token step its fused norm on streamed layers only."""

    def __init__(self, model: nn.Module, plan: OffloadPlan, names: dict[int, list[str]], source, device):
        self.model, self.plan, self.names, self.source = model, plan, names, source
        self.device = torch.device(device)
        self.order = list(plan.streamed)
        self._next = {i: self.order[(j + 1) % len(self.order)] for j, i in enumerate(self.order)}
        self._owners = {i: [_owner(model, n) for n in names[i]] for i in self.order}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cpmant-prefetch")
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._bound: Optional[int] = None
        self.loads = 0  # layer loads (prefetched or not), for tests and the benchmark
        self.waits = 0  # layer starts that found their layer not yet loaded
        self._handles = []
        for i in self.order:
            layer = model.encoder.layers[i]
            first = layer.self_att.layernorm_before_attention if layer.self_att is not None else (
                layer.ffn.layernorm_before_ffn if layer.ffn is not None else None)
            if first is None:  # both sub-blocks pruned: no weights
                continue
            self._handles.append(first.register_forward_pre_hook(self._make_enter(i)))
            self._unbind(i)
        self._handles.append(model.encoder.output_layernorm.register_forward_pre_hook(lambda m, a: self._release()))

    def _load(self, i: int) -> None:
        self.source.load(i)
        self.loads += 1

    def _prefetch(self, i: int) -> None:
        if i in self._pending or self.source.is_loaded(i):
            return
        if self.source.asynchronous:  # the copy itself runs elsewhere (a CUDA side stream): issue it from here
            self._load(i)
        else:
            self._pending[i] = self._pool.submit(self._load, i)

    def _make_enter(self, i: int):
        def enter(module, args):
            if self._bound == i:  # the norm called twice in one layer (never in this model): nothing to do
                return
            self._release()
            fut = self._pending.pop(i, None)
            if fut is not None:
                if not fut.done():
                    self.waits += 1
                fut.result()
            elif not self.source.is_loaded(i):
                self.waits += 1
                self._load(i)
            tensors = self.source.bind(i)
            for (mod, attr), t in zip(self._owners[i], tensors):
                _assign(mod, attr, t)
            self._bound = i
            nxt = self._next[i]
            if nxt != i:
                self._prefetch(nxt)
        return enter

    def _release(self) -> None:
        i, self._bound = self._bound, None
        if i is None:
            return
        self._unbind(i)
        self.source.done(i, keep=len(self.order) <= 2)

    def _unbind(self, i: int) -> None:
        for (mod, attr), n in zip(self._owners[i], self.names[i]):
            _assign(mod, attr, torch.empty(0, dtype=self.source.dtype_of(n), device=self.device))
        # the int8 kernel's packed weights (per Linear, and fused across q/k/v and w_0/w_1) are copies: they go with
        # the layer (every owner sits inside it)
        drop_packs(self.model.encoder.layers[i])

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._pool.shutdown(wait=True)


class _MmapSource:
    """CPU: the streamed layers are views into the mapped file; load = fault the pages in, done = drop them."""

    asynchronous = False  # load blocks: run it on the prefetch thread

    def __init__(self, mf: _MappedFile, names: dict[int, list[str]]):
        self.mf, self.names = mf, names
        self._loaded: set[int] = set()

    def dtype_of(self, name: str) -> torch.dtype:
        return self.mf.index[name].dtype

    def is_loaded(self, i: int) -> bool:
        return i in self._loaded

    def load(self, i: int) -> None:
        self.mf.populate(self.names[i])
        self._loaded.add(i)

    def bind(self, i: int) -> list[torch.Tensor]:
        return [self.mf.view(n) for n in self.names[i]]

    def done(self, i: int, keep: bool) -> None:
        if not keep:
            self._loaded.discard(i)
            self.mf.release(self.names[i])


class _CudaRingSource:
    """CUDA (BMInf's scheduler): streamed layers in pinned CPU memory, two GPU buffers filled on a side stream.

    Unverified on this project's CPU machines (gpu-tier test: tests/test_gpu.py)."""

    asynchronous = True  # load only enqueues copies on the side stream

    def __init__(self, mf: _MappedFile, names: dict[int, list[str]], device: torch.device):
        self.names, self.device = names, device
        self.dtypes = {n: mf.index[n].dtype for ns in names.values() for n in ns}
        self.pinned = {n: mf.copy(n).pin_memory() for ns in names.values() for n in ns}
        align = 256
        self.layout: dict[int, list[tuple[int, int]]] = {}
        size = 0
        for i, ns in names.items():
            off, lay = 0, []
            for n in ns:
                lay.append((off, self.pinned[n].nbytes))
                off += -(-self.pinned[n].nbytes // align) * align
            self.layout[i] = lay
            size = max(size, off)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]
        self.side = torch.cuda.Stream(device=device)
        self.ready = [torch.cuda.Event() for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]
        self.holds: list[Optional[int]] = [None, None]
        self._last = 1

    def dtype_of(self, name: str) -> torch.dtype:
        return self.dtypes[name]

    def is_loaded(self, i: int) -> bool:
        return i in self.holds

    def _views(self, s: int, i: int) -> list[torch.Tensor]:
        return [self.slots[s][o:o + nb].view(self.pinned[n].dtype).view(self.pinned[n].shape)
                for n, (o, nb) in zip(self.names[i], self.layout[i])]

    def load(self, i: int) -> None:
        s = 1 - self._last  # the buffer not used by the layer that ran last
        self._last = s
        self.holds[s] = i
        self.side.wait_event(self.free[s])  # its previous layer's forward has finished on the compute stream
        with torch.cuda.stream(self.side):
            for dst, n in zip(self._views(s, i), self.names[i]):
                dst.copy_(self.pinned[n], non_blocking=True)
            self.ready[s].record(self.side)

    def bind(self, i: int) -> list[torch.Tensor]:
        s = self.holds.index(i)
        self._last = s
        torch.cuda.current_stream(self.device).wait_event(self.ready[s])
        return self._views(s, i)

    def done(self, i: int, keep: bool) -> None:
        s = self.holds.index(i)
        self.free[s].record(torch.cuda.current_stream(self.device))
