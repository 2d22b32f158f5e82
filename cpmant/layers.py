"""The building blocks of CPM-Ant in plain PyTorch (CPM-Live `cpm_live/layers`), assembled by `cpmant.model.CPMAnt`.

RMSNorm, Linear, Embedding, the segment-aware relative position bias, attention, the gated-GELU FFN, the block, the
encoder, and the `KVCache` that decoding fills. Module and parameter names equal CPM-Live's. Shapes: B batch,
L sequence, D dim_model, H heads, Dh dim_head, F dim_ff, V vocab.

They live apart from `cpmant.model` so that the fused one-token decoding step (`cpmant.decode`) and the int8 and
MoE modules (`cpmant.modules`) can name these classes while the model imports the step (no import cycle).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


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
        self.step_plan = None  # the one-token step's cpmant.decode.StepPlan, worked out at a generation's first step

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


def plain_forward(*mods: nn.Module) -> bool:
    """Modules whose forward is their class's own, unhooked (a delta or a hook changes what they compute)."""
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in mods)
