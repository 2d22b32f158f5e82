"""Memory: the budget a user gives (`MemoryBudget`, parsed once where it is given) and the peak memory of a block of
code (`PeakMemory`: the process's resident set above its baseline, and CUDA's allocator peak).

    MemoryBudget.parse("64MB")  -> MemoryBudget(bytes=67108864, text="64MB");  MemoryBudget.parse(None) -> None
                                   (None is "no budget": every layer resident)

    with PeakMemory() as pm:
        generate(...)
    pm.peak_mb        # MiB of resident memory above the RSS at enter (the baseline, taken after imports)
    pm.cuda_peak_mb   # CUDA: torch.cuda.max_memory_allocated() during the block minus memory_allocated() at enter
                      # (MiB; None without CUDA); pm.cuda_max_allocated_mb is the absolute peak

"After imports" includes torch's lazy ones: the first operation on the meta device (which checkpoint loading uses
to build a model without allocating it) imports torch's meta registrations, about 75 MiB of resident memory once
per process. `PeakMemory()` does that first (`prime_torch()`), so that the peak counts what the code allocates.

RSS is sampled on a background thread every `interval_s` (default 2 ms) and once more at exit, so a spike shorter
than the interval can be missed; the allocator's own peak (CUDA) is exact. psutil reads the RSS (no library gives a
sampled peak of a code block: `resource.getrusage` only has the process-lifetime maximum, which the baseline hides).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryBudget:
    """A memory budget in bytes (positive), with the text it was given as (for messages). Made once at the edge
    (`cpmant generate --memory-budget`); below it code takes `budget.bytes` or None for no budget."""

    bytes: int
    text: str

    @classmethod
    def parse(cls, text: str | int | None) -> "MemoryBudget | None":
        """`64MB`, `1.5GB`, `512KiB` or a number of bytes (binary units, cpmant.offload.sizes.parse_size); None for
        None (no budget). A bad or non-positive size is one CpmantError naming it and the form to write."""
        if text is None:
            return None
        from .offload.sizes import parse_size

        return cls(parse_size(text), str(text))


_primed = False


def prime_torch() -> None:
    """Do torch's lazy imports that cost resident memory once per process (the meta device's registrations)."""
    global _primed
    if not _primed:
        import torch

        torch.empty(2, 2, device="meta").normal_()
        _primed = True


class PeakMemory:
    """Context manager measuring the peak resident set (above the baseline at enter) and the CUDA peak.

    prime: run `prime_torch()` before taking the baseline (default True)."""

    def __init__(self, interval_s: float = 0.002, cuda: bool | None = None, prime: bool = True):
        self.interval_s = float(interval_s)
        self._prime = prime
        self._cuda = cuda
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline_bytes = 0
        self.peak_bytes = 0  # the highest RSS seen (absolute)
        self.samples = 0
        self.cuda_peak_mb: float | None = None
        self.cuda_max_allocated_mb: float | None = None
        self._cuda_base = 0

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _sample(self) -> None:
        rss = self._rss()
        self.samples += 1
        if rss > self.peak_bytes:
            self.peak_bytes = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _cuda_on(self) -> bool:
        if self._cuda is not None:
            return self._cuda
        import torch

        return torch.cuda.is_available()

    def __enter__(self) -> "PeakMemory":
        if self._prime:
            prime_torch()
        if self._cuda_on():
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self.baseline_bytes = self._rss()
        self.peak_bytes = self.baseline_bytes
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cpmant-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._cuda_on():
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.cuda_max_allocated_mb = peak / MIB
            self.cuda_peak_mb = max(0, peak - self._cuda_base) / MIB
        return None

    @property
    def peak_mb(self) -> float:
        """Peak RSS above the baseline, in MiB (never negative)."""
        return max(0, self.peak_bytes - self.baseline_bytes) / MIB

    @property
    def baseline_mb(self) -> float:
        return self.baseline_bytes / MIB

    def as_dict(self) -> dict[str, float | None]:
        return {"peak_memory_mb": round(self.peak_mb, 3), "baseline_memory_mb": round(self.baseline_mb, 3),
                "cuda_peak_memory_mb": None if self.cuda_peak_mb is None else round(self.cuda_peak_mb, 3),
                "cuda_max_allocated_mb": (None if self.cuda_max_allocated_mb is None
                                          else round(self.cuda_max_allocated_mb, 3))}
