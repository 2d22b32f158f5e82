"""Mixture-of-experts feed-forward (MoEfication, Zhang et al. 2022): the FFN's dim_ff neurons form `num_experts`
contiguous groups; per token a router keeps the `top_k` groups and the others contribute nothing.

The router is a buffer `...ffn.ffn.router.weight` (num_experts, dim_model) (not trained); a token's expert scores are
its normed FFN input times that weight.

Two computations of the same function. Dense (training, and whenever a gradient is wanted): every neuron is
computed and the unselected experts' activations are zeroed before w_out. Routed (inference): the tokens are
grouped by expert (one sort), and each expert that got tokens runs its own rows of w_0 / w_1 and its own columns of
w_out on its tokens only, summed back with index_add; experts with no tokens cost nothing. An int8 model's experts
run through the int8 kernel on their own prepacked slices (`QuantLinear.forward_part`). The routed path needs the
three Linears plain (no delta or hook wrapping them: it reads their weights directly); otherwise the dense one runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CpmantError
from ..layers import FeedForward, plain_forward


class Router(nn.Module):
    """Expert scores: x (..., D) -> (..., E) = x @ weight.T; weight (E, D) is an fp32 buffer (not trained)."""

    def __init__(self, num_experts: int, dim_model: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_experts, dim_model, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class MoEFeedForward(FeedForward):
    """FeedForward whose neurons form `num_experts` contiguous experts; per token only the router's top_k are used."""

    def __init__(self, dim_model: int, dim_ff: int, dropout_p: float, num_experts: int, top_k: int):
        super().__init__(dim_model, dim_ff, dropout_p)
        if dim_ff % num_experts or not 1 <= top_k <= num_experts:
            raise CpmantError(f"cannot split dim_ff={dim_ff} into {num_experts} experts with top_k={top_k}",
                              "choose num_experts dividing dim_ff and 1 <= top_k <= num_experts")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = Router(num_experts, dim_model)

    @classmethod
    def from_ffn(cls, ffn: FeedForward, num_experts: int, top_k: int,
                 router_weight: torch.Tensor | None = None) -> "MoEFeedForward":
        """A MoEFeedForward taking over ffn's w_in / w_out modules (no copy); router zero unless given."""
        with torch.device("meta"):  # its own w_in / w_out are replaced at once: never allocate them
            moe = cls(ffn.w_out.dim_out, ffn.w_out.dim_in, ffn.dropout_p, num_experts, top_k)
        moe.w_in, moe.w_out = ffn.w_in, ffn.w_out
        dev = ffn.w_out.weight.device
        moe.router.weight = (router_weight if router_weight is not None
                             else torch.zeros(num_experts, ffn.w_out.dim_out)).to(dev, torch.float32)
        return moe

    def expert_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(..., E) with 1 for the top_k experts of each token (x: the normed FFN input (..., D))."""
        s = self.router(x)
        return torch.zeros_like(s).scatter_(-1, s.topk(self.top_k, dim=-1).indices, 1.0)

    def _routable(self) -> bool:
        mods = (self.w_in, self.w_in.w_0, self.w_in.w_1, self.w_out)
        return all(hasattr(m, "forward_part") or m is self.w_in for m in mods) and plain_forward(*mods)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as the dense forward, computing only the experts the tokens chose. x (..., D)."""
        shape, D = x.shape, x.size(-1)
        xf = x.reshape(-1, D)
        N, E, k = xf.size(0), self.num_experts, self.top_k
        fe = self.w_out.dim_in // E
        chosen = self.router(xf).topk(k, dim=-1).indices.flatten()  # (N*k,) expert of each (token, choice)
        order = chosen.argsort(stable=True)
        tokens = order // k  # the token of each choice, grouped by expert
        counts = torch.bincount(chosen, minlength=E).tolist()  # the one host sync
        out, start = None, 0
        w0, w1, wo = self.w_in.w_0, self.w_in.w_1, self.w_out
        for e, c in enumerate(counts):
            if not c:
                continue
            idx = tokens[start : start + c]
            start += c
            part = slice(e * fe, (e + 1) * fe)
            xe = xf.index_select(0, idx)
            h = F.gelu(w0.forward_part(xe, rows=part)) * w1.forward_part(xe, rows=part)  # (c, fe)
            y = wo.forward_part(h, cols=part)  # (c, D)
            if out is None:
                out = y.new_zeros(N, y.size(-1))
            out.index_add_(0, idx, y)
        return out.view(*shape[:-1], -1)

    def forward(self, x):  # (B, L, D) -> (B, L, D)
        if (self.top_k < self.num_experts and not (self.training and self.dropout_p)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.w_out.weight.requires_grad))
                and self._routable()):
            return self.routed(x)
        a = self.w_in(x)  # (B, L, F)
        if self.top_k < self.num_experts:
            keep = self.expert_mask(x).to(a.dtype)  # (B, L, E)
            a = (a.unflatten(-1, (self.num_experts, -1)) * keep[..., None]).flatten(-2)
        if self.dropout_p and self.training:
            a = F.dropout(a, self.dropout_p, True)
        return self.w_out(a)


def swap_in_moe(model: nn.Module, num_experts: int, top_k: int) -> int:
    """Replace every kept FFN of model.encoder by a MoEFeedForward with a zero router (to load a state dict into)."""
    n = 0
    for layer in model.encoder.layers:
        if layer.ffn is not None:
            layer.ffn.ffn = MoEFeedForward.from_ffn(layer.ffn.ffn, num_experts, top_k)
            n += 1
    return n
