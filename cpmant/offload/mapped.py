"""The safetensors file read in place: its index with byte offsets, a memory map with zero-copy tensor views, page
prefetch and release (madvise), and a writer that takes tensors one at a time."""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CpmantError

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels answer EINVAL and we touch the pages instead


# ---- the safetensors file, read in place -----------------------------------------------------------------
# Written by hand: the safetensors library gives tensors (copies, or views it owns) but not the byte offsets that
# madvise needs, nor a writer that takes tensors one at a time (the int8 cache is written layer by layer so that
# quantizing never holds the whole model). The format is one little-endian u64 header length, a JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}} and the data; https://github.com/huggingface/safetensors.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_index(path: str | Path) -> dict[str, _Entry]:
    """{name: entry with absolute byte offsets} of a safetensors file (reads only its header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CpmantError(f"{path} is not a safetensors file (too short)", "use a complete checkpoint folder")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CpmantError(f"{path} has a damaged safetensors header ({e})", "pull the checkpoint again") from None
    start = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if e["dtype"] not in _DTYPES:
            raise CpmantError(f"{path}: tensor {name} has dtype {e['dtype']}, which streaming does not read",
                              "load the model fully (without --memory-budget)")
        b, en = e["data_offsets"]
        out[name] = _Entry(_DTYPES[e["dtype"]], tuple(e["shape"]), start + b, start + en)
    return out


def write_safetensors_streaming(path: Path, items: list[tuple[str, torch.dtype, tuple[int, ...]]], produce,
                                after=None) -> None:
    """Write a safetensors file whose tensors `produce(name)` returns one at a time (in the header's order);
    `after(name)` is called once each is written."""
    order = sorted(items, key=lambda t: (-torch.empty(0, dtype=t[1]).element_size(), t[0]))  # alignment, as upstream
    header, off = {}, 0
    for name, dtype, shape in order:
        nb = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in order:
            t = produce(name)
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), name
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            if after is not None:
                after(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_libc = None


def _madvise(addr: int, length: int, advice: int) -> bool:
    """madvise(2) through ctypes, which releases the GIL (Python's mmap.madvise holds it for the whole call)."""
    global _libc
    if length <= 0:
        return True
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(advice)) == 0


class _MappedFile:
    """A read-only memory map of a safetensors file and zero-copy tensor views into it."""

    def __init__(self, path: Path):
        self.path = path
        self.index = read_safetensors_index(path)
        self._f = open(path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # read-only buffer: inference never writes weights
            warnings.simplefilter("ignore", UserWarning)
            self._bytes = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.base = self._bytes.data_ptr()
        self._populate_ok = True

    def view(self, name: str) -> torch.Tensor:
        e = self.index[name]
        return self._bytes[e.begin:e.end].view(e.dtype).view(e.shape)

    def copy(self, name: str) -> torch.Tensor:
        """The tensor in memory of its own (the file's pages are released after the copy)."""
        t = self.view(name).clone()
        self.release([name])
        return t

    def _pages(self, names, inward: bool):
        for n in names:
            e = self.index[n]
            if inward:
                b, en = -(-e.begin // _PAGE) * _PAGE, e.end // _PAGE * _PAGE
            else:
                b, en = e.begin // _PAGE * _PAGE, -(-e.end // _PAGE) * _PAGE
            if en > b:
                yield b, en

    def populate(self, names) -> None:
        """Fault the pages of `names` into the process (the prefetch): MADV_POPULATE_READ, else touch a byte a page."""
        for b, en in self._pages(names, inward=False):
            if self._populate_ok and _madvise(self.base + b, en - b, _MADV_POPULATE_READ):
                continue
            self._populate_ok = False
            _madvise(self.base + b, en - b, _MADV_WILLNEED)
            self._bytes[b:en:_PAGE].sum()  # one read per page, in C++ (no GIL)

    def release(self, names) -> None:
        """Drop the pages of `names` from the process's resident set (they stay in the page cache)."""
        for b, en in self._pages(names, inward=True):
            _madvise(self.base + b, en - b, _MADV_DONTNEED)

    def close(self) -> None:
        self._bytes = None
        try:
            self._mm.close()
        except BufferError:  # views still alive somewhere: the map goes with them
            pass
        self._f.close()
