"""CPM-Ant in plain PyTorch, faithful to CPM-Live (branch `cpm-ant`, `cpm_live/models/ant.py`).

Built bottom-up: RMSNorm, Linear, Embedding, the segment-aware relative position bias, attention, the gated-GELU
FFN, the block, the encoder, the model. Module and parameter names equal CPM-Live's, so a CPM-Live state dict loads
with no renaming. Shapes: B batch, L sequence, D dim_model, H heads, Dh dim_head, F dim_ff, V vocab.

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
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import CpmantError


class KVCache:
    """Keys and values of the positions decoded so far: per layer one (H, B, capacity, Dh) buffer each (head-major,
    as attention uses them), filled in place up to `length`. Decoding n more positions writes n columns; nothing is
    copied unless the capacity runs out (then it doubles). A layer whose attention is masked keeps None.

    `cache[i]` is layer i's filled (keys, values), views of shape (H, B, length, Dh), or None.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity, self.length = int(capacity), 0
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers
        self._spare: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers  # reorder_'s targets

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        k, v = self.keys[i], self.values[i]
        return None if k is None else (k[:, :, : self.length], v[:, :, : self.length])

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer i's new keys/values (H, B, n, Dh) after the first `length` columns; return all of them,
        (H, B, length + n, Dh) views of the buffers. `advance(n)` moves `length` once every layer has written."""
        end = self.length + k.size(2)
        buf = self.keys[i]
        if buf is None or end > buf.size(2):  # first write, or out of room: a larger buffer, the filled part copied
            cap = max(end, self.capacity if buf is None else 2 * buf.size(2))
            nk, nv = k.new_empty(*k.shape[:2], cap, k.size(3)), v.new_empty(*v.shape[:2], cap, v.size(3))
            if buf is not None:
                nk[:, :, : self.length] = buf[:, :, : self.length]
                nv[:, :, : self.length] = self.values[i][:, :, : self.length]
            self.keys[i], self.values[i], self._spare[i] = nk, nv, None
            self.capacity = max(self.capacity, cap)
        self.keys[i][:, :, self.length : end] = k
        self.values[i][:, :, self.length : end] = v
        return self.keys[i][:, :, :end], self.values[i][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder_(self, index: torch.Tensor) -> "KVCache":
        """Batch row r becomes row index[r] (beam search); index (R,). The filled columns are gathered into a spare
        pair of buffers that then swaps with the current one (one copy, no allocation after the first); R may
        differ from B (new buffers with R rows)."""
        n = self.length
        for i, k in enumerate(self.keys):
            if k is None:
                continue
            v = self.values[i]
            if index.numel() != k.size(1):
                self.keys[i], self.values[i], self._spare[i] = k.index_select(1, index), v.index_select(1, index), None
                continue
            sk, sv = self._spare[i] or (torch.empty_like(k), torch.empty_like(v))
            for src, dst in ((k, sk), (v, sv)):
                out = torch.index_select(src[:, :, :n], 1, index, out=dst[:, :, :n])
                if out.data_ptr() != dst.data_ptr():  # written elsewhere (never seen): put it in place
                    dst[:, :, :n] = out
            self.keys[i], self.values[i], self._spare[i] = sk, sv, (k, v)
        return self

    def reordered(self, index: torch.Tensor) -> "KVCache":
        """A new cache holding rows `index` of this one (this one unchanged)."""
        out = KVCache(len(self), self.capacity)
        out.length = self.length
        out.keys = [None if k is None else k.index_select(1, index) for k in self.keys]
        out.values = [None if v is None else v.index_select(1, index) for v in self.values]
        return out


class RMSNorm(nn.Module):
    """CPM-Live's LayerNorm: RMS normalisation with the variance in fp32, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        var = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Linear(nn.Module):
    """CPM-Live's Linear (scale_before=False): y = x @ W.T / sqrt(dim_in), W stored (dim_out, dim_in), no bias.

    The scale is applied to the smallest of input, output and weight (same result, least memory traffic); delta
    methods that wrap this module (LoRA on project_q/project_v) see CPM-Live's scaled output.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        # OpenDelta's LoRA reads these (CPM-Live's Linear sets the same two for it)
        self.in_features, self.out_features = dim_in, dim_out
        self.scale = 1.0 / math.sqrt(dim_in)
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim_in) -> (..., dim_out)
        rows = x.numel() // self.dim_in
        if rows > max(self.dim_in, self.dim_out):  # training-sized batch: scaling the weight is cheapest
            return F.linear(x, self.weight * self.scale)
        if self.dim_out <= self.dim_in:
            return F.linear(x, self.weight) * self.scale
        return F.linear(x * self.scale, self.weight)

    def forward_part(self, x: torch.Tensor, rows: Optional[slice] = None, cols: Optional[slice] = None):
        """x (N, len(cols) or dim_in) times the weight's rows / columns (an MoE expert's part), scaled as forward
        (by 1/sqrt(dim_in) of the whole Linear)."""
        w = self.weight if rows is None else self.weight[rows]
        return F.linear(x, w if cols is None else w[:, cols]) * self.scale


class Embedding(nn.Module):
    """CPM-Live's Embedding: lookup / sqrt(D); `projection` is the tied output layer."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        return F.embedding(ids, self.weight) / math.sqrt(self.dim)

    def projection(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, num)
        return F.linear(x / math.sqrt(self.dim), self.weight)


def position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5 bidirectional log buckets of rel = key_pos - query_pos (CPM-Live `_position_bucket`, bidirectional)."""
    num_buckets //= 2
    out = (rel > 0).to(torch.int32) * num_buckets  # keys after the query use the upper half
    rel = rel.abs()
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(rel.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.int32)
    large = large.clamp(max=num_buckets - 1)
    return out + torch.where(rel < max_exact, rel.to(torch.int32), large)


class SegmentPositionEmbedding(nn.Module):
    """Segment-aware relative position bias: table (segment_types^2 + num_buckets, H).

    Same segment: T5 bucket of (key_pos - query_pos); across segments: num_buckets + q_seg * segment_types + k_seg.
    """

    def __init__(self, num_heads: int, num_segments: int, num_buckets: int, max_distance: int):
        super().__init__()
        self.num_heads, self.num_segments = num_heads, num_segments
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Parameter(torch.empty(num_segments * num_segments + num_buckets, num_heads))

    @torch.no_grad()
    def bucket(self, key_pos, query_pos, key_segment, query_segment) -> torch.Tensor:
        # key_*: (B, Lk), query_*: (B, Lq) -> (B, Lq, Lk) long
        key_pos, key_segment = key_pos[:, None, :].long(), key_segment[:, None, :].long()
        query_pos, query_segment = query_pos[:, :, None].long(), query_segment[:, :, None].long()
        across = self.num_buckets + query_segment * self.num_segments + key_segment
        inside = position_bucket(key_pos - query_pos, self.num_buckets, self.max_distance)
        return torch.where(key_segment == query_segment, inside.long(), across)

    def forward(self, key_pos, query_pos, key_segment, query_segment, mask: Optional[torch.Tensor] = None):
        """(H, B, Lq, Lk) bias, head-major; where `mask` (B, Lq, Lk, bool) is False the entry is -inf."""
        bucket = self.bucket(key_pos, query_pos, key_segment, query_segment)  # (B, Lq, Lk)
        table = self.relative_attention_bias.t()  # (H, rows)
        if mask is not None:  # one extra -inf column: bias and mask come out of a single gather
            table = torch.cat([table, table.new_full((self.num_heads, 1), float("-inf"))], dim=1)
            bucket = bucket.masked_fill(~mask, table.size(1) - 1)
        # index_select straight into the layout attention wants (its backward, index_add, is cheap: few rows)
        return table.index_select(1, bucket.flatten()).view(self.num_heads, *bucket.shape)


class Attention(nn.Module):
    def __init__(self, dim_model: int, num_heads: int, dim_head: int, dropout_p: float):
        super().__init__()
        self.num_heads, self.dim_head, self.dropout_p = num_heads, dim_head, dropout_p
        self.project_q = Linear(dim_model, num_heads * dim_head)
        self.project_k = Linear(dim_model, num_heads * dim_head)
        self.project_v = Linear(dim_model, num_heads * dim_head)
        self.attention_out = Linear(num_heads * dim_head, dim_model)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, L, H*Dh) -> (H, B, L, Dh)
        B, L, _ = t.shape
        return t.view(B, L, self.num_heads, self.dim_head).permute(2, 0, 1, 3).contiguous()

    def forward(self, x: torch.Tensor, bias: torch.Tensor, past_kv: Optional[tuple[KVCache, int]] = None):
        # x (B, Lq, D); bias (H, B, Lq, Lk) additive, -inf where masked; past_kv: (cache, this layer's index) or None.
        # Head-major (H, B, ...) layout throughout: the bias is gathered in it, q/k/v take one copy each into it.
        B, Lq, _ = x.shape
        H, Dh = self.num_heads, self.dim_head
        q, k, v = self._heads(self.project_q(x)), self._heads(self.project_k(x)), self._heads(self.project_v(x))
        if past_kv is not None:  # incremental decoding: the new keys/values join the earlier ones in the cache
            k, v = past_kv[0].write(past_kv[1], k, v)  # (H, B, T, Dh) views of preallocated buffers
        p = self.dropout_p if self.training else 0.0
        if x.is_cuda:  # fused kernels (they also give the bias its gradient)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (H, B, Lq, Dh)
        else:  # on CPU plain ops are faster: scores = q k^T / sqrt(Dh) + bias in one baddbmm
            Lk = k.size(2)
            qf, kf, vf = q.view(H * B, Lq, Dh), k.view(H * B, Lk, Dh), v.view(H * B, Lk, Dh)
            s = torch.baddbmm(bias.reshape(H * B, Lq, Lk), qf, kf.transpose(1, 2), alpha=1.0 / math.sqrt(Dh))
            s = F.dropout(s.softmax(-1), p, True) if p else s.softmax(-1)  # dropout on the probabilities (CPM-Live)
            o = torch.bmm(s, vf).view(H, B, Lq, Dh)  # (H, B, Lq, Dh)
        o = o.permute(1, 2, 0, 3).reshape(B, Lq, H * Dh)
        return self.attention_out(o)  # (B, Lq, D)


class SelfAttentionBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.layernorm_before_attention = RMSNorm(c.dim_model, c.eps)
        self.self_attention = Attention(c.dim_model, c.num_heads, c.dim_head, c.dropout_p)
        self.dropout_p = c.dropout_p

    def forward(self, h, bias, past_kv=None):
        out = self.self_attention(self.layernorm_before_attention(h), bias, past_kv)
        if self.dropout_p and self.training:
            out = F.dropout(out, self.dropout_p, True)
        return h + out


class DenseGatedACT(nn.Module):
    def __init__(self, dim_in: int, dim_ff: int):
        super().__init__()
        self.w_0 = Linear(dim_in, dim_ff)
        self.w_1 = Linear(dim_in, dim_ff)

    def forward(self, x):  # (B, L, D) -> (B, L, F): gelu(w_0 x) * (w_1 x)
        return F.gelu(self.w_0(x)) * self.w_1(x)


class FeedForward(nn.Module):
    def __init__(self, dim_model: int, dim_ff: int, dropout_p: float):
        super().__init__()
        self.w_in = DenseGatedACT(dim_model, dim_ff)
        self.w_out = Linear(dim_ff, dim_model)
        self.dropout_p = dropout_p

    def forward(self, x):  # (B, L, D) -> (B, L, D)
        x = self.w_in(x)
        if self.dropout_p and self.training:
            x = F.dropout(x, self.dropout_p, True)
        return self.w_out(x)


class FFNBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.layernorm_before_ffn = RMSNorm(c.dim_model, c.eps)
        self.ffn = FeedForward(c.dim_model, c.dim_ff, c.dropout_p)
        self.dropout_p = c.dropout_p

    def forward(self, h):
        out = self.ffn(self.layernorm_before_ffn(h))
        if self.dropout_p and self.training:
            out = F.dropout(out, self.dropout_p, True)
        return h + out


class TransformerBlock(nn.Module):
    """Pre-norm attention then FFN, each with a residual; a masked sub-block is None (residual only, no weights)."""

    def __init__(self, config: ModelConfig, mask_att: bool = False, mask_ffn: bool = False):
        super().__init__()
        self.self_att = None if mask_att else SelfAttentionBlock(config)
        self.ffn = None if mask_ffn else FFNBlock(config)

    def forward(self, h, bias, past_kv=None):
        if self.self_att is not None:
            h = self.self_att(h, bias, past_kv)
        if self.ffn is not None:
            h = self.ffn(h)
        return h


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        masks = config.mask_modules or [(False, False)] * config.num_layers
        self.layers = nn.ModuleList([TransformerBlock(config, a, f) for a, f in masks])
        self.output_layernorm = RMSNorm(config.dim_model, config.eps)

    def forward(self, h, bias, past_key_values: Optional[KVCache] = None, hidden: Optional[list] = None):
        """h (B, L, D) -> normed (B, L, D). With a cache, layer i writes its L new keys/values into it."""
        for i, layer in enumerate(self.layers):
            h = layer(h, bias, None if past_key_values is None else (past_key_values, i))
            if hidden is not None:
                hidden.append(h)
        if past_key_values is not None:
            past_key_values.advance(h.size(1))
        return self.output_layernorm(h)


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
                and not torch.is_autocast_enabled(input.device.type) and self._decode_plan(cache) is not None):
            return self._decode_one(input, segment[:, q_start], cache, bias), cache
        h = self.embed(input, segment[:, q_start:], first=q_start == 0)
        if bias is None:
            bias = self.attention_bias(length, context, position, segment, span, q_start)  # (H, B, n, T)
        h = self.encoder(h, bias, cache)
        return self.input_embedding.projection(h[:, -1:] if last_only else h).float(), cache

    # ---- one decoding step with the fewest operations --------------------------------------------------------------
    def _decode_one(self, input, segment, cache: KVCache, bias) -> torch.Tensor:
        """One new token per row: input (B, 1), segment (B,), bias (H, B, 1, T). The same function as the encoder's
        modules, written out on (B, D) rows so that a step issues about a third of the tensor operations (decoding
        small models is bound by the cost per operation, not by arithmetic): each plain Linear is one mm with its
        1/sqrt(dim_in) folded into the input it shares with its siblings (q/k/v, w_0/w_1), the residual add and the
        output scale are one addmm, and keys/values go straight into the cache; int8 q/k/v (and w_0/w_1) are one
        fused int8 matmul (`cpmant.modules.quant.fused_forward`). Any module that is not plain (int8,
        MoE, a delta wrapping project_q/project_v, a hook) is called as a module instead, so it computes what it
        always does. fp32 or one dtype throughout (autocast takes the module path)."""
        plan = self._decode_plan(cache)
        h = (F.embedding(input[:, 0], self.input_embedding.weight)
             + F.embedding(segment, self.segment_embedding.weight)) * (1.0 / math.sqrt(self.config.dim_model))
        for i, (layer, (att_kind, ffn_kind)) in enumerate(zip(self.encoder.layers, plan)):
            if layer.self_att is not None:
                h = _attention_one(layer.self_att, h, bias, cache, i, att_kind)
            if layer.ffn is not None:
                h = _ffn_one(layer.ffn, h, ffn_kind)
        cache.advance(1)
        h = _rms(self.encoder.output_layernorm, h)
        return self.input_embedding.projection(h[:, None]).float()

    def _decode_plan(self, cache: KVCache) -> Optional[list]:
        """Per layer (attention kind, FFN kind) for _decode_one, kept on the cache (one generation); None when the
        encoder or a layer is not the plain class or is wrapped (a memory-budget scheduler, a hook): then the
        modules run as modules."""
        got = cache.__dict__.get("_plan")
        if got is not None and got[0] is self:
            return got[1]
        layers = self.encoder.layers
        ok = (type(self.encoder) is Encoder and _plain(self.encoder, layers)
              and all(type(layer) is TransformerBlock and _plain(layer) for layer in layers))
        plan = [_layer_plan(layer) for layer in layers] if ok else None
        cache.__dict__["_plan"] = (self, plan)
        return plan

    @staticmethod
    def reorder_cache(past_key_values: KVCache, index: torch.Tensor) -> KVCache:
        """A cache of rows `index` (R,) of `past_key_values` (beam search); `KVCache.reorder_` does it in place."""
        return past_key_values.reordered(index)


# ---- the one-token decoding step's pieces (CPMAnt._decode_one) -----------------------------------------------------
# The int8 kernel lives in cpmant.modules.quant, which imports this module: it registers its QuantLinear and itself
# here when imported (an int8 model cannot exist before), so this module never imports it (no import cycle).
_INT8: dict = {}
DEFAULT_KERNEL_MIN_WEIGHTS = 1 << 17  # cpmant.modules.quant.KERNEL_MIN_WEIGHTS before that module is imported


def register_int8(cls: type, ops) -> None:
    """cpmant.modules.quant calls this: `cls` is its QuantLinear, `ops` the module (fused_forward,
    small_float_weight, KERNEL_MIN_WEIGHTS), read at each use so that tests may patch it."""
    _INT8["cls"], _INT8["ops"] = cls, ops


def _kernel_min_weights() -> int:
    ops = _INT8.get("ops")
    return DEFAULT_KERNEL_MIN_WEIGHTS if ops is None else ops.KERNEL_MIN_WEIGHTS

def _plain(*mods: nn.Module) -> bool:
    """Modules whose forward is their class's own, unhooked (a delta or a hook changes what they compute)."""
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in mods)


def _kind(*lins: nn.Module):
    """"plain" when every one is an unwrapped Linear, "int8" when every one is an unwrapped QuantLinear, else None."""
    kinds = [("plain", Linear)] + ([("int8", _INT8["cls"])] if _INT8 else [])
    for kind, cls in kinds:
        if all(type(m) is cls for m in lins) and _plain(*lins) and len({m.dim_in for m in lins}) == 1:
            return kind
    return None


def _layer_plan(layer: "TransformerBlock") -> tuple:
    """(attention's kind, FFN's kind): how _decode_one computes them ("plain": their weights directly; "int8": q/k/v
    and w_0/w_1 as one fused int8 matmul; None: module calls)."""
    att = ffn = None
    # a hook on a layer's norm may bind its weights at each step (memory-budget streaming hooks the first norm):
    # then the layer's weights are read at each step, never copied once for the generation
    norms = [b for b in (layer.self_att and layer.self_att.layernorm_before_attention,
                         layer.ffn and layer.ffn.layernorm_before_ffn) if b is not None]
    copies = _plain(*norms)
    if layer.self_att is not None:
        a = layer.self_att.self_attention
        if _plain(layer.self_att, a) and _kind(a.attention_out) == _kind(a.project_q, a.project_k, a.project_v):
            att = _kind(a.project_q, a.project_k, a.project_v)
            if not copies:
                pass
            elif att == "int8":
                att = _small_int8(att, (a.project_q, a.project_k, a.project_v), (a.attention_out,))
            elif att == "plain":
                att = _small_plain(att, (a.project_q, a.project_k, a.project_v), a.attention_out)
    if layer.ffn is not None:
        f = layer.ffn.ffn
        if (type(f) is FeedForward and type(f.w_in) is DenseGatedACT and _plain(layer.ffn, f, f.w_in)
                and _kind(f.w_out) == _kind(f.w_in.w_0, f.w_in.w_1)):
            ffn = _kind(f.w_in.w_0, f.w_in.w_1)
            if not copies:
                pass
            elif ffn == "int8":
                ffn = _small_int8(ffn, (f.w_in.w_0, f.w_in.w_1), (f.w_out,))
            elif ffn == "plain":
                ffn = _small_plain(ffn, (f.w_in.w_0, f.w_in.w_1), f.w_out)
    return att, ffn


def _small_plain(kind, first: tuple, second: "Linear"):
    """Small float matrices (under cpmant.modules.quant.KERNEL_MIN_WEIGHTS together): ("float", the first ones
    stacked, the second), scales folded in, copied once per generation, so that q/k/v (w_0/w_1) are one mm; larger
    ones stay "plain" (no copy of large weights)."""
    if sum(m.weight.numel() for m in first) + second.weight.numel() >= _kernel_min_weights():
        return kind
    return ("float", torch.cat([m.weight * m.scale for m in first]), second.weight * second.scale)


def _small_int8(kind, first: tuple, second: tuple):
    """For int8 matrices too small for the kernel (within int8_kernel()): their float copies, taken once for the
    whole generation as ("float", stacked first weights, second weight), each with its 1/sqrt(dim_in) folded in."""
    small_float_weight = _INT8["ops"].small_float_weight
    dev = first[0].weight.device
    probe = torch.empty(0, first[0].dim_in, device=dev)
    w1 = small_float_weight(first, probe)
    w2 = small_float_weight(second, torch.empty(0, second[0].dim_in, device=dev))
    return ("float", w1, w2) if w1 is not None and w2 is not None else kind


def _rms(norm: "RMSNorm", x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or not _plain(norm):
        return norm(x)
    # F.rms_norm issues about twenty operations on the CPU; these are five
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _attention_one(block: "SelfAttentionBlock", h, bias, cache: KVCache, i: int, kind) -> torch.Tensor:
    a = block.self_attention
    B = h.size(0)
    H, Dh = a.num_heads, a.dim_head
    x = _rms(block.layernorm_before_attention, h)
    plain = kind == "plain"
    if plain:
        xs = x * a.project_q.scale
        q, k, v = (torch.mm(xs, m.weight.t()) for m in (a.project_q, a.project_k, a.project_v))
    elif kind == "int8":
        q, k, v = _INT8["ops"].fused_forward((a.project_q, a.project_k, a.project_v), x)
    elif kind is not None:  # ("float", q/k/v stacked, attention_out): an int8 model's small matrices
        q, k, v = torch.mm(x, kind[1].t()).split(H * Dh, dim=-1)
    else:
        q, k, v = a.project_q(x), a.project_k(x), a.project_v(x)
    k, v = cache.write(i, k.view(B, H, 1, Dh).transpose(0, 1), v.view(B, H, 1, Dh).transpose(0, 1))
    T = k.size(2)
    q = q.view(B, H, Dh).transpose(0, 1).reshape(H * B, 1, Dh)
    s = torch.baddbmm(bias.reshape(H * B, 1, T), q, k.reshape(H * B, T, Dh).transpose(1, 2),
                      alpha=1.0 / math.sqrt(Dh))
    o = torch.bmm(s.softmax(-1), v.reshape(H * B, T, Dh))  # (H*B, 1, Dh)
    o = o.view(H, B, Dh).transpose(0, 1).reshape(B, H * Dh)
    if plain:
        return torch.addmm(h, o, a.attention_out.weight.t(), alpha=a.attention_out.scale)
    if isinstance(kind, tuple):
        return torch.addmm(h, o, kind[2].t())
    return h + a.attention_out(o)


def _ffn_one(block: "FFNBlock", h, kind) -> torch.Tensor:
    x = _rms(block.layernorm_before_ffn, h)
    f = block.ffn
    if kind == "int8":
        a, b = _INT8["ops"].fused_forward((f.w_in.w_0, f.w_in.w_1), x)
        return h + f.w_out(F.gelu(a).mul_(b))
    if isinstance(kind, tuple):  # ("float", w_0/w_1 stacked, w_out): an int8 model's small matrices
        a, b = torch.mm(x, kind[1].t()).chunk(2, dim=-1)
        return torch.addmm(h, F.gelu(a).mul_(b), kind[2].t())
    if kind != "plain":
        return h + f(x)
    xs = x * f.w_in.w_0.scale
    g = F.gelu(torch.mm(xs, f.w_in.w_0.weight.t())).mul_(torch.mm(xs, f.w_in.w_1.weight.t()))
    return torch.addmm(h, g, f.w_out.weight.t(), alpha=f.w_out.scale)
