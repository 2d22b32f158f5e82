"""FLOPs per token and the machine's measured matmul peak, for model FLOPs utilisation (MFU) and the 10B projection
(cpmant/projection.py counts every model's FLOPs per token with `flops_per_token`, as training's MFU does)."""

from __future__ import annotations

import time

from .config import ModelConfig


def flops_per_token(config: ModelConfig, seq_len: int, vocab_share: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul parameters + attention scores (PaLM appendix B).

    The tied output projection counts once more as a matmul (vocab x dim_model), for the share of positions that
    are projected onto the vocabulary (`vocab_share`: the loop projects only positions with a target).
    """
    att_kept, ffn_kept = config.kept()
    d, hd = config.dim_model, config.num_heads * config.dim_head
    matmul_params = (att_kept * 4 * d * hd + ffn_kept * 3 * d * config.dim_ff
                     + vocab_share * config.vocab_size * d)
    attention = 12 * att_kept * hd * seq_len
    return 6.0 * matmul_params + attention


def measure_matmul_peak(dtype=None, n: int = 2048, seconds: float = 0.5, device: str = "cpu") -> float:
    """Peak FLOP/s of square matmuls on this machine with the current torch thread count.

    The best single matmul over `seconds` is taken (not the mean), so that other load on the machine lowers the
    estimate as little as possible: MFU against a lowered peak would read too high. The operands come from a
    private generator: the global random state (dropout, a resumed run's draws) is left as it was. `dtype`: a
    torch dtype, float32 by default (torch is imported here: the FLOP count above needs no torch).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 >= t_end:
            break
    return 2.0 * n**3 / best
