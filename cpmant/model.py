"""CPM-Ant in plain PyTorch, faithful to CPM-Live (branch `cpm-ant`, `cpm_live/models/ant.py`).

The model assembles the blocks of `cpmant.layers` (RMSNorm, Linear, Embedding, the segment-aware relative position
bias, attention, the gated-GELU FFN, the block, the encoder). Module and parameter names equal CPM-Live's, so a
CPM-Live state dict loads with no renaming. Shapes: B batch, L sequence, D dim_model, H heads, Dh dim_head,
F dim_ff, V vocab.

CPM-Live conventions kept here:
- every Linear divides its output by sqrt(dim_in); weights are initialised N(0, 1) (also the embeddings and the
  position-bias table), RMSNorm weights to 1;
- embeddings (token, prompt, segment) are divided by sqrt(D); logits = (h / sqrt(D)) @ input_embedding.weight.T;
- the first `prompt_length` positions of `input` index the prompt table, the rest the token table;
- the position bias and the attention mask are computed once per forward and shared by all layers.
Speed: one gather builds the additive attention mask (position bias, -inf where masked) straight in head-major
(H, B, Lq, Lk) layout; on CPU attention is baddbmm (scores + bias in one GEMM) -> softmax -> bmm, which beats
F.scaled_dot_product_attention there (its CPU kernels fall back to the math path when the bias needs a gradient);
on CUDA it is F.scaled_dot_product_attention. Each Linear applies its 1/sqrt(dim_in) to whichever of input, weight
or output is smallest. Padding rows (fully masked) are given their own diagonal, so nothing is ever NaN.
Decoding: `KVCache` holds every layer's keys/values in buffers allocated once for the whole generation and
filled in place (`inference(..., max_length=...)`).
One new token per row with a precomputed bias takes the fused one-token step of `cpmant.decode`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import decode
from .config import ModelConfig
from .errors import CpmantError
from .layers import Embedding, Encoder, KVCache, Linear, RMSNorm, SegmentPositionEmbedding


class CPMAnt(nn.Module):
    """CPM-Ant (CPM-Live `CPMAnt`): forward(input, length, context, position, segment, span) -> logits (B, L, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.prompt_length = c.prompt_length
        self.encoder = Encoder(c)
        self.prompt_embedding = Embedding(c.prompt_types * c.prompt_length, c.dim_model)
        self.segment_embedding = Embedding(c.segment_types, c.dim_model)
        self.input_embedding = Embedding(c.vocab_size, c.dim_model)
        self.position_bias = SegmentPositionEmbedding(
            c.num_heads, c.segment_types, c.position_bias_num_buckets, c.position_bias_max_distance
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CPM-Live init: every weight N(0, 1) (embeddings, Linears, position-bias table), RMSNorm weights 1."""
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, (Linear, Embedding)):
                nn.init.normal_(m.weight, 0.0, 1.0)
        nn.init.normal_(self.position_bias.relative_attention_bias, 0.0, 1.0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- inputs -> embeddings and the shared attention bias ---------------------------------------
    def _check_length(self, seqlen: int) -> None:
        limit = self.config.position_bias_max_distance
        if seqlen > limit:
            raise CpmantError(
                f"sequence length {seqlen} exceeds position_bias_max_distance {limit}",
                f"use seq_len <= {limit} (prompt included), or a preset with a larger position_bias_max_distance",
            )

    def embed(self, input: torch.Tensor, segment: torch.Tensor, first: bool = True) -> torch.Tensor:
        """(B, L) ids -> (B, L, D): prompt table for the first prompt_length positions (when `first`), tokens after."""
        P = self.prompt_length if first else 0
        h = F.embedding(input[:, P:], self.input_embedding.weight)  # (B, L-P, D)
        if P:
            h = torch.cat([F.embedding(input[:, :P], self.prompt_embedding.weight), h], dim=1)  # prompt (B, P, D) first
        # (prompt|token + segment) / sqrt(D): CPM-Live divides each embedding by sqrt(D)
        return (h + F.embedding(segment, self.segment_embedding.weight)) * (1.0 / math.sqrt(self.config.dim_model))

    @torch.no_grad()
    def attention_mask(self, length, context, span, q_start: int = 0) -> torch.Tensor:
        """(B, Lq, Lk) bool, query rows q_start..: context[j] or (not context[i] and j <= i), same span, both < length.

        The diagonal is always allowed so that padding rows (fully masked otherwise) stay finite; valid rows
        already allow themselves, so their values are unchanged.
        """
        Lk = context.size(1)
        dev = context.device
        ctx = context.bool()
        kpos = torch.arange(Lk, device=dev)
        qpos = kpos[q_start:]
        causal = kpos[None, :] <= qpos[:, None]  # (Lq, Lk)
        mask = ctx[:, None, :] | (~ctx[:, q_start:, None] & causal)
        mask &= span[:, q_start:, None] == span[:, None, :]
        valid = kpos[None, :] < length[:, None]  # (B, Lk)
        mask &= valid[:, q_start:, None] & valid[:, None, :]
        return mask | (kpos[None, :] == qpos[:, None])

    def attention_bias(self, length, context, position, segment, span, q_start: int = 0) -> torch.Tensor:
        """(H, B, Lq, Lk) additive: position bias, -inf where masked. Computed once, shared by every layer."""
        mask = self.attention_mask(length, context, span, q_start)
        return self.position_bias(position, position[:, q_start:], segment, segment[:, q_start:], mask=mask)

    # ---- the model ---------------------------------------------------------------------------------
    def forward(self, input, length, context, position, segment, span, return_hidden: bool = False,
                logits_at: Optional[torch.Tensor] = None):
        """input, context, position, segment, span: (B, L); length: (B,). Returns logits (B, L, V) in fp32.

        With return_hidden, returns (logits, hidden) where hidden[i] (B, L, D) is the output of layer i (the
        residual stream, before the final norm). Positions >= length hold finite values that mean nothing.
        With logits_at, a (B, L) bool mask, only those positions are projected onto the vocabulary: logits are
        (N, V) in the mask's row-major order. Training needs logits only where there are targets (about a third
        of the positions in CPM-Ant's objectives), and the vocabulary projection is the largest matmul.
        """
        self._check_length(input.size(1))
        h = self.embed(input, segment)  # (B, L, D)
        bias = self.attention_bias(length, context, position, segment, span)  # (H, B, L, L)
        hidden = [] if return_hidden else None
        h = self.encoder(h, bias, hidden=hidden)  # (B, L, D), normed
        if logits_at is not None:
            h = h[logits_at]  # (N, D)
        logits = self.input_embedding.projection(h).float()  # (B, L, V) or (N, V), tied to the token table
        return (logits, hidden) if return_hidden else logits

    @torch.no_grad()
    def inference(self, input, length, context, position, segment, span, past_key_values: Optional[KVCache] = None,
                  max_length: Optional[int] = None, bias: Optional[torch.Tensor] = None, last_only: bool = False):
        """CPM-Live's incremental decoding. context/position/segment/span (B, T) and length (B,) describe the whole
        sequence so far; `input` holds only the positions not yet in `past_key_values` (all T on the first call).
        Returns (logits (B, n, V) fp32, the cache): the cache is updated in place (a new one, with room for
        `max_length` positions (default T), when none is given). Equals `forward` when later tokens are
        non-context. `bias` (H, B, n, T), when given, is `attention_bias(length, context, position, segment, span,
        T - n)` computed ahead by the caller (a decoder builds it for many steps at once). With `last_only` the
        logits are those of the last position only, (B, 1, V) (a decoder's prompt needs no others)."""
        T, n = position.size(1), input.size(1)
        self._check_length(T)
        q_start = T - n
        cache = past_key_values if past_key_values is not None else KVCache(len(self.encoder.layers), max_length or T)
        if cache.length != q_start:
            raise ValueError(f"the cache holds {cache.length} positions but the inputs describe {T} with {n} new")
        if (bias is not None and n == 1 and q_start > 0 and not self.training
                and not torch.is_autocast_enabled(input.device.type)):
            plan = decode.step_plan(self, cache)
            if plan.fused:
                return decode.one_token(self, plan, input, segment[:, q_start], cache, bias), cache
        h = self.embed(input, segment[:, q_start:], first=q_start == 0)
        if bias is None:
            bias = self.attention_bias(length, context, position, segment, span, q_start)  # (H, B, n, T)
        h = self.encoder(h, bias, cache)
        return self.input_embedding.projection(h[:, -1:] if last_only else h).float(), cache

    @staticmethod
    def reorder_cache(past_key_values: KVCache, index: torch.Tensor) -> KVCache:
        """A cache of rows `index` (R,) of `past_key_values` (beam search); `KVCache.reorder_` does it in place."""
        return past_key_values.reordered(index)
