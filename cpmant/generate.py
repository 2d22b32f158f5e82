"""Text generation as CPM-Ant does it (CPM-Live `generation/ant.py`), with a KV cache.

Input: `[<s>] + encode(text)` with `<unk>` dropped, after the task-2 prompt (prompt ids 2P..3P-1; task 0 when the
model has fewer than 3 prompt types); everything is context, the text is segment 2, the prompt segment 0, positions
0..L-1, span 0. Steps: `</s>` and newline are banned at the first step; pad, `<unk>` and `<s>` at every step
(they decode to nothing); CTRL repetition penalty on the tokens generated so far; stop at `</s>`.

Batching: rows are laid out `[prompt][padding][text]` so every row ends at the same column and the KV cache is one
tensor. Padding gets span 1 (the text has span 0), so no real position attends to it, and positions skip it, so
each row computes exactly what it would alone. Cached decoding equals a full forward in which the generated tokens
are non-context (each sees the past only), which is what CPM-Live's cached `inference` computes.

Speed: the KV cache (`cpmant.model.KVCache`) and the inputs of every column are allocated once for the prompt plus
`max_new_tokens`, and each step writes one column in place; the per-row work (bans, penalty, finished rows, `</s>`,
beam bookkeeping) is tensor operations over all rows at once. The host waits for the device only to ask whether
every row has finished (every step on CPU, every few steps on an accelerator) and once at the end for the ids.

Settings: `GenerationConfig` (cpmant/generation_config.py) holds them, their defaults and their allowed ranges.

Precision (`GenerationConfig.precision`, see `generation_precision`): bf16 runs the forward passes under bf16
autocast (weights stay fp32, the cache holds bf16, the logits come out fp32); `auto` is bf16 on CUDA with compute
capability 8.0 or more and fp32 on the CPU even where it multiplies bf16 natively. Decoding multiplies a few rows
at a time: the matrices are small and autocast's casts cost about what bf16 saves. Measured on AMD EPYC with
AVX-512 BF16, 1 thread, 64 new tokens, greedy, best of 2-3 rounds alternating fp32/bf16/int8 in one process
(load average 1.2-4 from other work; bf16/fp32 tokens/s): tiny preset 0.59-0.71x at batch 1, 0.77x at 4,
0.85-1.01x at 8, 1.21x at 32; d256/4 layers 0.67-0.95x at batch 1, 1.22x at 4, 1.24x at 8, 1.66x at 32. bf16 pays
only for batches of many rows, and a batch-size threshold would give a text one continuation alone and another in
a batch: so `auto` is fp32 and large batches may ask for bf16. The int8 path (`quantize_model`) is no faster than
fp32 either except by chance (0.72-1.19x, one outlier 1.85x at tiny batch 1 under load). torch.compile of the
one-token forward (dynamic shapes) was 1.4x eager per token but took 122 s to compile the tiny preset: not offered.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from .errors import CpmantError
from .generation_config import GenerationConfig
from .precision import autocast, resolve_precision

__all__ = ["GenerationConfig", "generate", "generate_ids", "generation_precision", "encode_inputs", "build_batch"]

PAD_SPAN = 1  # span id of the padding between prompt and text
SYNC_EVERY_ACCELERATED = 8  # on an accelerator, steps between checks that every row has finished (each check waits)


def _prompt_task(config) -> int:
    return 2 if config.prompt_types >= 3 else 0


def encode_inputs(tokenizer, texts: list[str], config, max_new_tokens: int) -> list[list[int]]:
    """[<s>] + encode(text) without <unk>, truncated from the left (keeping <s>) to fit the position limit."""
    budget = config.position_bias_max_distance - config.prompt_length - max_new_tokens
    if budget < 1:
        raise CpmantError(
            f"prompt_length {config.prompt_length} + max_new_tokens {max_new_tokens} leaves no room for input under "
            f"position_bias_max_distance {config.position_bias_max_distance}",
            "lower max_new_tokens",
        )
    out = []
    for text in texts:
        ids = [tokenizer.bos_id] + [i for i in tokenizer.encode(text) if i != tokenizer.unk_id]
        if len(ids) > budget:
            warnings.warn(
                f"input of {len(ids)} tokens truncated from the left to {budget} "
                f"(position_bias_max_distance {config.position_bias_max_distance}, prompt {config.prompt_length}, "
                f"max_new_tokens {max_new_tokens})",
                stacklevel=3,
            )
            ids = [tokenizer.bos_id] + ids[len(ids) - budget + 1 :]
        out.append(ids)
    return out


def build_batch(rows: list[list[int]], config, device) -> dict[str, torch.Tensor]:
    """Model inputs (B, T) for rows laid out [prompt][padding][text], every row ending at column T-1."""
    P, B = config.prompt_length, len(rows)
    n = max(len(r) for r in rows)
    T = P + n
    prompt = torch.arange(P) + _prompt_task(config) * P
    inp = torch.zeros(B, T, dtype=torch.long)
    position = torch.zeros(B, T, dtype=torch.long)
    segment = torch.zeros(B, T, dtype=torch.long)
    span = torch.zeros(B, T, dtype=torch.long)
    inp[:, :P], position[:, :P] = prompt, torch.arange(P)
    for b, r in enumerate(rows):
        pad = n - len(r)
        inp[b, T - len(r) :] = torch.tensor(r)
        position[b, T - len(r) :] = torch.arange(P, P + len(r))
        segment[b, T - len(r) :] = 2
        span[b, P : P + pad] = PAD_SPAN
    batch = dict(input=inp, context=torch.ones(B, T, dtype=torch.long), position=position, segment=segment, span=span,
                 length=torch.full((B,), T, dtype=torch.long))
    return {k: v.to(device) for k, v in batch.items()}


class _Sequence:
    """A batch being decoded: the inputs of every column, allocated once for T0 + max_new_tokens columns, and the
    model's KV cache. `start` runs the T0 given columns, `step` one more token per row."""

    def __init__(self, model, batch: dict[str, torch.Tensor], max_new_tokens: int):
        self.model = model
        B, T0 = batch["input"].shape
        dev = batch["input"].device
        more = lambda t, v: torch.cat([t, t.new_full((B, max_new_tokens), v)], dim=1)  # noqa: E731
        # each new column: a context token of segment 2, span 0, at the next position of its row
        self.columns = dict(
            context=more(batch["context"], 1),
            position=torch.cat([batch["position"], batch["position"][:, -1:]
                                + torch.arange(1, max_new_tokens + 1, device=dev)], dim=1),
            segment=more(batch["segment"], 2),
            span=more(batch["span"], 0),
        )
        self.input, self.T, self.capacity = batch["input"], T0, T0 + max_new_tokens
        self.cache = None

    def _state(self) -> dict[str, torch.Tensor]:
        state = {k: v[:, : self.T] for k, v in self.columns.items()}
        state["length"] = torch.full((self.input.size(0),), self.T, dtype=torch.long, device=self.input.device)
        return state

    def start(self) -> torch.Tensor:
        """Logits (B, V) after the given columns."""
        logits, self.cache = self.model.inference(self.input, **self._state(), max_length=self.capacity)
        return logits[:, -1]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Append tok (R,) to every row; logits (R, V) after it."""
        self.T += 1
        logits, self.cache = self.model.inference(tok[:, None], past_key_values=self.cache, **self._state())
        return logits[:, -1]

    def expand(self, index: torch.Tensor) -> None:
        """Rows become rows `index` (R,) of the current ones (beam search: each text's row num_beams times)."""
        self.columns = {k: v.index_select(0, index) for k, v in self.columns.items()}
        self.input = self.input.index_select(0, index)
        self.cache.reorder_(index)

    def reorder(self, index: torch.Tensor) -> None:
        """Beams of one text swap histories: only the cache differs (their input columns are equal)."""
        self.cache.reorder_(index)


class _Bans:
    """Bans and CTRL repetition penalty, in place on fresh logits (R, V) fp32; seen (R, V) bool: tokens so far."""

    def __init__(self, tokenizer, repetition_penalty: float, device):
        ids = lambda *xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        self.always = ids(tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id)
        self.first = ids(tokenizer.eos_id, tokenizer.newline_id)
        self.penalty = float(repetition_penalty)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor, step: int) -> torch.Tensor:
        logits.index_fill_(1, self.always, float("-inf"))
        if step == 0:
            logits.index_fill_(1, self.first, float("-inf"))
        if self.penalty != 1.0:
            p = self.penalty
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        return logits


def process_logits(logits, seen, step: int, tokenizer, repetition_penalty: float):
    """Bans and CTRL repetition penalty (a new tensor). logits (R, V) fp32, seen (R, V) bool: tokens so far."""
    return _Bans(tokenizer, repetition_penalty, logits.device)(logits.clone(), seen, step)


def _sync_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else SYNC_EVERY_ACCELERATED


def _until_eos(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


def sample(logits, temperature: float, top_k: int, top_p: float, generator: Optional[torch.Generator]):
    """(R, V) -> (R,) token ids: argmax when temperature == 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def _sample_loop(model, tokenizer, batch, cfg: GenerationConfig,
                 generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Greedy (temperature 0) or sampled decoding; per row the generated ids before </s>."""
    B, V, n = batch["input"].size(0), model.config.vocab_size, cfg.max_new_tokens
    dev = batch["input"].device
    seq, bans, every = _Sequence(model, batch, n), _Bans(tokenizer, cfg.repetition_penalty, dev), _sync_every(dev)
    rows = torch.arange(B, device=dev)
    seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = torch.full((B, n), tokenizer.pad_id, dtype=torch.long, device=dev)
    logits, steps = seq.start(), 0
    for step in range(n):
        tok = sample(bans(logits, seen, step), cfg.temperature, cfg.top_k, cfg.top_p, generator)
        tok = tok.masked_fill(done, tokenizer.pad_id)  # finished rows emit padding (they no longer count)
        out[:, step] = tok
        seen[rows, tok] = True
        done |= tok == tokenizer.eos_id
        steps = step + 1
        if steps == n or (steps % every == 0 and bool(done.all())):
            break
        logits = seq.step(tok)
    return _until_eos(out[:, :steps].tolist(), tokenizer.eos_id)


@torch.no_grad()
def _beam_loop(model, tokenizer, batch, cfg: GenerationConfig, length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search (HF-style bookkeeping): 2*num_beams candidates per step, a hypothesis ends at </s>.

    Per text: the finished hypotheses are the best num_beams (score / length**length_penalty) of those whose </s>
    was among the best num_beams candidates of its step; the live beams are the best num_beams candidates that are
    not </s>; a text is done when it holds num_beams hypotheses and the worst beats the best live beam. All of it
    is kept in tensors (B, num_beams, ...) and updated for every text at once.
    """
    B, V, nb, n = batch["input"].size(0), model.config.vocab_size, cfg.num_beams, cfg.max_new_tokens
    dev = batch["input"].device
    seq, bans, every = _Sequence(model, batch, n), _Bans(tokenizer, cfg.repetition_penalty, dev), _sync_every(dev)
    idx = torch.arange(B, device=dev).repeat_interleave(nb)
    logits = seq.start().index_select(0, idx)
    seq.expand(idx)
    ninf = float("-inf")
    scores = torch.full((B, nb), ninf, device=dev)
    scores[:, 0] = 0.0  # only the first beam is live at the start
    tokens = torch.full((B * nb, n), tokenizer.pad_id, dtype=torch.long, device=dev)  # each beam's ids so far
    seen = torch.zeros(B * nb, V, dtype=torch.bool, device=dev)
    rows = torch.arange(B * nb, device=dev)
    first_row = (torch.arange(B, device=dev) * nb)[:, None]  # (B, 1)
    home = torch.cat([rows.view(B, nb), rows.new_zeros(B, 1)], dim=1)  # a slot no candidate fills keeps its row
    in_top = torch.arange(2 * nb, device=dev) < nb  # an </s> outside the best num_beams candidates is no hypothesis
    # finished hypotheses, best first: scores (fp64, as the lengths divide them), ids, lengths, how many
    hyp_scores = torch.full((B, nb), ninf, dtype=torch.float64, device=dev)
    hyp_tokens = torch.full((B, nb, n), tokenizer.pad_id, dtype=torch.long, device=dev)
    hyp_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
    hyp_count = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = 0
    for step in range(n):
        logp = F.log_softmax(bans(logits, seen, step), dim=-1)
        cand = (scores.view(-1, 1) + logp).view(B, nb * V)
        top_scores, top_ids = cand.topk(2 * nb, dim=1)  # (B, 2nb), best first
        tok, src = top_ids % V, top_ids // V + first_row  # candidate token and the row of its beam
        valid = (top_scores != ninf) & ~done[:, None]
        is_eos = tok == tokenizer.eos_id
        denom = float((step + 1) ** length_penalty)
        # new hypotheses join the old ones; keep the best nb (a stable sort: earlier ones first among equals)
        new = valid & is_eos & in_top
        all_scores = torch.cat([hyp_scores, torch.where(new, top_scores.double() / denom, ninf)], dim=1)
        order = all_scores.sort(dim=1, descending=True, stable=True).indices[:, :nb]
        hyp_scores = all_scores.gather(1, order)
        hyp_tokens = torch.cat([hyp_tokens, tokens[src]], dim=1).gather(1, order[..., None].expand(-1, -1, n))
        hyp_len = torch.cat([hyp_len, torch.full_like(src, step)], dim=1).gather(1, order)
        hyp_count = (hyp_count + new.sum(1)).clamp(max=nb)
        # live beams: the best nb candidates that are not </s>, in order; slot nb collects the rest (dropped)
        live = valid & ~is_eos
        rank = live.cumsum(1) - 1
        slot = torch.where(live & (rank < nb), rank, nb)
        next_scores = scores.new_full((B, nb + 1), ninf).scatter(1, slot, top_scores)[:, :nb].contiguous()
        next_tok = tok.new_full((B, nb + 1), tokenizer.pad_id).scatter(1, slot, tok)[:, :nb].reshape(-1)
        next_src = home.scatter(1, slot, src)[:, :nb].reshape(-1)
        best_live = next_scores[:, 0].double() / denom
        done |= (hyp_count == nb) & (hyp_scores[:, -1] >= best_live)
        tokens = tokens.index_select(0, next_src)
        tokens[:, step] = next_tok
        seen = seen.index_select(0, next_src)
        seen[rows, next_tok] = True
        scores, steps = next_scores, step + 1
        if steps == n or (steps % every == 0 and bool(done.all())):
            break
        seq.reorder(next_src)
        logits = seq.step(next_tok)
    hs, ht, hl, hc = hyp_scores.tolist(), hyp_tokens.tolist(), hyp_len.tolist(), hyp_count.tolist()
    live_scores, live_tokens, finished = scores.tolist(), tokens[:, :steps].tolist(), done.tolist()
    out = []
    for b in range(B):
        hyps = [(hs[b][j], ht[b][j][: hl[b][j]]) for j in range(hc[b])]
        if not finished[b]:  # out of steps: the live beams compete with the finished ones
            hyps += [(live_scores[b][j] / steps**length_penalty, live_tokens[b * nb + j]) for j in range(nb)]
        out.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
    return out


def _resolve(config: Union[GenerationConfig, Mapping[str, Any], None], overrides: dict) -> GenerationConfig:
    if config is None:
        config = GenerationConfig()
    elif isinstance(config, Mapping):
        config = GenerationConfig.from_params(config)
    elif not isinstance(config, GenerationConfig):
        raise CpmantError(f"config must be a GenerationConfig or a dict, not {type(config).__name__}",
                          "pass GenerationConfig(...) or keyword settings such as max_new_tokens=32")
    return GenerationConfig.from_params(overrides, base=config) if overrides else config


def generation_precision(setting: str, device: Union[str, torch.device] = "cpu") -> str:
    """The precision decoding runs in (fp32 or bf16): `auto` is fp32 on the CPU (decoding is faster there in fp32,
    figures in the module docstring) and `cpmant.precision.resolve_precision` elsewhere (bf16 where native)."""
    resolved = resolve_precision(setting, device)  # also rejects an unknown setting
    if setting == "auto" and torch.device(device).type == "cpu":
        return "fp32"
    return resolved


def generate_ids(model, tokenizer, texts: list[str],
                 config: Union[GenerationConfig, Mapping[str, Any], None] = None, **overrides) -> list[list[int]]:
    """Continue each text; per text the generated ids (no prompt, no </s>), at most max_new_tokens of them.

    `config` (default GenerationConfig()) with `overrides` (its field names) replaced. Greedy when temperature 0;
    num_beams > 1 runs beam search. The forward passes run in `generation_precision(cfg.precision, device)`.
    """
    cfg = _resolve(config, overrides)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise CpmantError("texts must be a list of strings", "pass [text] for one text")
    if not texts:
        return []
    device = next(model.parameters()).device
    batch = build_batch(encode_inputs(tokenizer, list(texts), model.config, cfg.max_new_tokens), model.config, device)
    was_training = model.training
    model.eval()
    try:
        with autocast(generation_precision(cfg.precision, device), device):
            return _decode(model, tokenizer, batch, cfg, device)
    finally:
        model.train(was_training)


def _decode(model, tokenizer, batch, cfg: GenerationConfig, device) -> list[list[int]]:
    if cfg.num_beams > 1:
        return _beam_loop(model, tokenizer, batch, cfg)
    gen = None
    if cfg.temperature > 0 and cfg.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed)
    return _sample_loop(model, tokenizer, batch, cfg, gen)


def generate(model, tokenizer, texts: list[str], config: Union[GenerationConfig, Mapping[str, Any], None] = None,
             **overrides) -> list[str]:
    """Continue each text; returns only the continuations, decoded. Settings as `generate_ids`."""
    return [tokenizer.decode(x) for x in generate_ids(model, tokenizer, texts, config, **overrides)]
