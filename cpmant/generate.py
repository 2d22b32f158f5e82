"""Text generation as CPM-Ant does it (CPM-Live `generation/ant.py`), with a KV cache.

Input: `[<s>] + encode(text)` with `<unk>` dropped, after the task-2 prompt (prompt ids 2P..3P-1; task 0 when the
model has fewer than 3 prompt types); everything is context, the text is segment 2, the prompt segment 0, positions
0..L-1, span 0. Steps: `</s>` and newline are banned at the first step; every special that is no text at every step
(pad, `<unk>`, `<s>`, `<mask>`, `<sep>`, `<d>`, `</d>`, the sentinels `<s0>`..`<s58>` and a small vocab's `<unusedN>`
fillers: `banned_ids`); CTRL repetition penalty on the tokens generated so far; stop at `</s>`.

Batching: rows are laid out `[prompt][padding][text]` so every row ends at the same column and the KV cache is one
tensor. Padding gets span 1 (the text has span 0), so no real position attends to it, and positions skip it, so
each row computes exactly what it would alone. Cached decoding equals a full forward in which the generated tokens
are non-context (each sees the past only), which is what CPM-Live's cached `inference` computes.

Speed: the KV cache (`cpmant.model.KVCache`) and the inputs of every column are allocated once for the prompt plus
`max_new_tokens`, and each step writes one column in place; the attention bias of the coming steps is built for
many steps at once; a one-token step runs `cpmant.decode.one_token` (about a third of the tensor operations of the
module path: decoding small models costs per operation, not per multiply); everything runs under
torch.inference_mode. The per-row work (bans, penalty, finished rows, `</s>`, beam bookkeeping) is tensor operations over all rows at once.
The host waits for the device only to ask whether every row has finished (every step on CPU, every few steps on an
accelerator) and once at the end for the ids. int8 models multiply through the int8 kernel while decoding
(`cpmant.modules.quant.int8_kernel`); MoE models run only the routed experts (`cpmant.modules.moe`).

Streaming: `generate_stream(model, tokenizer, text, config=None, **overrides)` yields the continuation of one text in
pieces as tokens come, the same text as `generate`. Stop strings (`GenerationConfig.stop`): a row ends once its
decoded text contains one; `generate` and `generate_stream` cut the text before it.

Settings: `GenerationConfig` (cpmant/generation_config.py) holds them, their defaults and their allowed ranges.

Precision (`GenerationConfig.precision`, resolved by `cpmant.precision.resolve_precision(..., decoding=True)`): bf16
runs the forward passes under bf16 autocast (weights stay fp32, the cache holds bf16, the logits come out fp32);
`auto` is bf16 on CUDA with compute capability 8.0 or more and fp32 on the CPU even where it multiplies bf16
natively. Decoding multiplies a few rows at a time: the matrices are small and autocast's casts cost about what bf16
saves. Measured on AMD EPYC with AVX-512 BF16, 1 thread, 64 new tokens, greedy, best of 2-3 rounds alternating
fp32/bf16/int8 in one process (load average 1.2-4 from other work; bf16/fp32 tokens/s): tiny preset 0.59-0.71x at
batch 1, 0.77x at 4, 0.85-1.01x at 8, 1.21x at 32; d256/4 layers 0.67-0.95x at batch 1, 1.22x at 4, 1.24x at 8, 1.66x
at 32. bf16 pays only for batches of many rows, and a batch-size threshold would give a text one continuation alone
and another in a batch: so `auto` is fp32 and large batches may ask for bf16. (These bf16 figures predate the
one-token step.) torch.compile of the one-token forward (dynamic shapes) was 1.4x eager per token but took 122 s to
compile the tiny preset: not offered.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from .errors import CpmantError
from .generation_config import GenerationConfig
from .modules.quant import int8_kernel
from .precision import autocast, resolve_precision

__all__ = ["GenerationConfig", "generate", "generate_ids", "generate_stream", "encode_inputs",
           "build_batch", "banned_ids", "cut_at_stop"]

PAD_SPAN = 1  # span id of the padding between prompt and text
SYNC_EVERY_ACCELERATED = 8  # on an accelerator, steps between checks that every row has finished (each check waits)
BIAS_BLOCK_ELEMENTS = 1 << 22  # the attention bias of the coming steps is built this many floats at a time (16 MB)
NEVER_GENERATED = ("<pad>", "<unk>", "<mask>", "<sep>", "<s>", "<d>", "</d>")  # specials banned at every step
_banned_cache: "weakref.WeakKeyDictionary[Any, tuple[int, ...]]" = weakref.WeakKeyDictionary()


MAX_TOKEN_CHARS = 16  # longest token a tokenizer without `max_token_chars` may have (build_vocab's jieba words: 16)


def _prompt_task(config) -> int:
    return 2 if config.prompt_types >= 3 else 0


def encode_inputs(tokenizer, texts: list[str], config, max_new_tokens: int) -> list[list[int]]:
    """[<s>] + encode(text) without <unk>, truncated from the left (keeping <s>) to fit the position limit; a text
    longer than the budget could ever use is cut by characters first, so it is tokenised once and in bounded time."""
    budget = config.position_bias_max_distance - config.prompt_length - max_new_tokens
    if budget < 1:
        raise CpmantError(
            f"prompt_length {config.prompt_length} + max_new_tokens {max_new_tokens} leaves no room for input under "
            f"position_bias_max_distance {config.position_bias_max_distance}",
            "lower max_new_tokens",
        )
    # cut by characters before tokenising (jieba's segmentation is super-linear: 80k characters took a minute):
    # `budget` tokens of at most `max_token_chars` characters each never span more than `chars` characters
    chars = budget * max(1, int(getattr(tokenizer, "max_token_chars", MAX_TOKEN_CHARS)))
    out = []
    for text in texts:
        cut = f"{len(text)} characters, cut to the last {chars} before tokenising, then " if len(text) > chars else ""
        ids = [tokenizer.bos_id] + [i for i in tokenizer.encode(text[-chars:]) if i != tokenizer.unk_id]  # once
        if len(ids) > budget or cut:
            warnings.warn(
                f"input of {cut}{len(ids)} tokens truncated from the left to {min(budget, len(ids))} "
                f"(position_bias_max_distance {config.position_bias_max_distance}, prompt {config.prompt_length}, "
                f"max_new_tokens {max_new_tokens})",
                stacklevel=3,
            )
        if len(ids) > budget:
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
    model's KV cache. `start` runs the T0 given columns, `step` one more token per row.

    The attention bias of a decoding step (position bias, -inf where masked) depends only on the columns, which are
    all known at the start: it is built for many steps at once (blocks of at most BIAS_BLOCK_ELEMENTS floats) and
    each step takes its row, instead of bucketing positions and building the mask at every step."""

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
        self._bias, self._bias_from = None, 0  # (H, R, n, T_end) bias of query columns _bias_from.. (or None)

    def _state(self) -> dict[str, torch.Tensor]:
        state = {k: v[:, : self.T] for k, v in self.columns.items()}
        state["length"] = torch.full((self.input.size(0),), self.T, dtype=torch.long, device=self.input.device)
        return state

    def _step_bias(self) -> torch.Tensor:
        """(H, R, 1, T) bias of the query column T-1 over keys 0..T-1."""
        q = self.T - 1
        if self._bias is None or q >= self._bias_from + self._bias.size(2):
            c, H, R = self.columns, self.model.config.num_heads, self.input.size(0)
            end = min(self.capacity, q + max(1, BIAS_BLOCK_ELEMENTS // max(1, H * R * self.capacity)))
            cols = {k: v[:, :end] for k, v in c.items()}
            length = torch.full((R,), end, dtype=torch.long, device=self.input.device)
            self._bias = self.model.attention_bias(length, cols["context"], cols["position"], cols["segment"],
                                                   cols["span"], q_start=q)  # (H, R, end - q, end)
            self._bias_from = q
        i = q - self._bias_from
        return self._bias[:, :, i : i + 1, : self.T]

    def start(self) -> torch.Tensor:
        """Logits (B, V) after the given columns."""
        logits, self.cache = self.model.inference(self.input, **self._state(), max_length=self.capacity,
                                                  last_only=True)
        return logits[:, -1]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Append tok (R,) to every row; logits (R, V) after it."""
        self.T += 1
        logits, self.cache = self.model.inference(tok[:, None], past_key_values=self.cache, **self._state(),
                                                  bias=self._step_bias())
        return logits[:, -1]

    def expand(self, index: torch.Tensor) -> None:
        """Rows become rows `index` (R,) of the current ones (beam search: each text's row num_beams times)."""
        self.columns = {k: v.index_select(0, index) for k, v in self.columns.items()}
        self.input = self.input.index_select(0, index)
        self.cache.reorder_(index)
        self._bias = None

    def reorder(self, index: torch.Tensor) -> None:
        """Beams of one text swap histories: only the cache differs (their input columns are equal)."""
        self.cache.reorder_(index)


def banned_ids(tokenizer) -> tuple[int, ...]:
    """Ids never generated (CPM-Ant): pad, <unk>, <s>, and, where the tokenizer has a vocab (`decoder`, id ->
    token), <mask>, <sep>, <d>, </d>, the sentinels <s0>..<s58> and the <unusedN> fillers of a small vocab: they
    are no text (decode shows them as markup or drops them). </s> ends a row, </n> and </_> are text."""
    try:
        return _banned_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    from .tokenizer import SENTINELS

    ids = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id}
    decoder = getattr(tokenizer, "decoder", None)
    if isinstance(decoder, (list, tuple)):
        never = set(NEVER_GENERATED) | set(SENTINELS)
        ids |= {i for i, t in enumerate(decoder) if t in never or t.startswith("<unused")}
    out = tuple(sorted(ids))
    try:
        _banned_cache[tokenizer] = out
    except TypeError:  # not weakly referable: computed again next time
        pass
    return out


class _Bans:
    """Bans and CTRL repetition penalty, in place on fresh logits (R, V) fp32; seen (R, V) bool: tokens so far."""

    def __init__(self, tokenizer, repetition_penalty: float, device):
        ids = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        self.always = ids(banned_ids(tokenizer))
        self.first = ids((tokenizer.eos_id, tokenizer.newline_id))
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


class _Sampler:
    """Greedy (temperature 0) or sampled decoding, one column of tokens per `next()` call.

    `next()` returns the next token of every row (R,) (finished rows get pad), or None once max_new_tokens are out or
    every row has finished; it runs the forward pass of the previous column lazily, so no forward is wasted after
    the last token. Every tensor operation runs inside `ctx()` (inference mode, autocast), entered per call and never
    held across a yield, so a streaming caller's own code runs outside them. `finish(rows)` ends rows early (stop
    strings)."""

    def __init__(self, model, tokenizer, batch, cfg: GenerationConfig, generator, ctx):
        self.cfg, self.generator, self.ctx, self.tok = cfg, generator, ctx, tokenizer
        B, n = batch["input"].size(0), cfg.max_new_tokens
        dev = batch["input"].device
        self.n, self.every = n, _sync_every(dev)
        with ctx():
            self.seq, self.bans = _Sequence(model, batch, n), _Bans(tokenizer, cfg.repetition_penalty, dev)
            self.seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=dev)
            self.done = torch.zeros(B, dtype=torch.bool, device=dev)
            self.out = torch.full((B, n), tokenizer.pad_id, dtype=torch.long, device=dev)
        self.steps, self.last = 0, None

    def next(self) -> Optional[torch.Tensor]:
        step = self.steps
        if step == self.n:
            return None
        with self.ctx():
            if step and step % self.every == 0 and bool(self.done.all()):
                return None
            logits = self.seq.start() if self.last is None else self.seq.step(self.last)
            tok = sample(self.bans(logits, self.seen, step), self.cfg.temperature, self.cfg.top_k, self.cfg.top_p,
                         self.generator)
            tok = tok.masked_fill(self.done, self.tok.pad_id)  # finished rows emit padding (they no longer count)
            self.out[:, step] = tok
            if self.bans.penalty != 1.0:
                self.seen.scatter_(1, tok[:, None], True)
            self.done |= tok == self.tok.eos_id
        self.steps, self.last = step + 1, tok
        return tok

    def finish(self, rows: list[int]) -> None:
        with self.ctx():
            self.done[rows] = True

    def ids(self) -> list[list[int]]:
        return _until_eos(self.out[:, : self.steps].tolist(), self.tok.eos_id)


def _sample_loop(model, tokenizer, batch, cfg: GenerationConfig,
                 generator: Optional[torch.Generator] = None, ctx=None) -> list[list[int]]:
    """Greedy or sampled decoding; per row the generated ids before </s> (with stop strings: up to and including
    the token whose text completes the first stop string)."""
    s = _Sampler(model, tokenizer, batch, cfg, generator, ctx or torch.inference_mode)
    if not cfg.stop:
        while s.next() is not None:
            pass
        return s.ids()
    B = batch["input"].size(0)
    ids: list[list[int]] = [[] for _ in range(B)]
    live = set(range(B))
    while live and (tok := s.next()) is not None:
        stopped = []
        for b, t in enumerate(tok.tolist()):
            if b not in live:
                continue
            if t == tokenizer.eos_id:
                live.discard(b)
                continue
            ids[b].append(t)
            if _stop_at(tokenizer.decode(ids[b]), cfg.stop) is not None:
                stopped.append(b)
        if stopped:
            live.difference_update(stopped)
            s.finish(stopped)
    return ids


def _stop_at(text: str, stop: tuple[str, ...]) -> Optional[int]:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(x) for x in stop) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """text before the earliest occurrence of any stop string (the whole text when none occurs)."""
    i = _stop_at(text, tuple(stop)) if stop else None
    return text if i is None else text[:i]


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters a stream keeps back: the longest end of text that may begin a stop string, and
    a trailing U+FFFD (a character whose bytes a byte-level tokenizer has not finished)."""
    keep = 0
    for x in stop:
        for k in range(min(len(x) - 1, len(text)), keep, -1):
            if text.endswith(x[:k]):
                keep = k
                break
    if text[len(text) - keep - 1 : len(text) - keep] == "\ufffd":
        keep += 1
    return keep


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


def _decoding_context(model, cfg: GenerationConfig, device):
    """A factory of the context every decoding computation runs in: inference mode, the generation precision and
    the int8 kernel for int8 models (`cpmant.modules.quant.int8_kernel`)."""
    precision = resolve_precision(cfg.precision, device, decoding=True)  # auto: fp32 on the CPU (docstring)

    @contextlib.contextmanager
    def ctx():
        with torch.inference_mode(), autocast(precision, device), int8_kernel():
            yield

    return ctx


def _prepare(model, tokenizer, texts: list[str], cfg: GenerationConfig):
    device = next(model.parameters()).device
    batch = build_batch(encode_inputs(tokenizer, list(texts), model.config, cfg.max_new_tokens), model.config, device)
    return batch, device, _decoding_context(model, cfg, device)


def generate_ids(model, tokenizer, texts: list[str],
                 config: Union[GenerationConfig, Mapping[str, Any], None] = None, **overrides) -> list[list[int]]:
    """Continue each text; per text the generated ids (no prompt, no </s>), at most max_new_tokens of them.

    `config` (default GenerationConfig()) with `overrides` (its field names) replaced. Greedy when temperature 0;
    num_beams > 1 runs beam search. The forward passes run in `resolve_precision(cfg.precision, device, decoding=True)`, under
    torch.inference_mode. With `stop` strings, a greedy or sampled row ends with the token whose text completes
    the first stop string (the ids keep that token; `generate` cuts the text before the stop string).
    """
    cfg = _resolve(config, overrides)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise CpmantError("texts must be a list of strings", "pass [text] for one text")
    if not texts:
        return []
    batch, device, ctx = _prepare(model, tokenizer, texts, cfg)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, tokenizer, batch, cfg, device, ctx)
    finally:
        model.train(was_training)


def _generator(cfg: GenerationConfig, device) -> Optional[torch.Generator]:
    if cfg.temperature > 0 and cfg.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed)
        return gen
    return None


def _decode(model, tokenizer, batch, cfg: GenerationConfig, device, ctx=None) -> list[list[int]]:
    ctx = ctx or _decoding_context(model, cfg, device)
    if cfg.num_beams > 1:
        with ctx():
            return _beam_loop(model, tokenizer, batch, cfg)
    return _sample_loop(model, tokenizer, batch, cfg, _generator(cfg, device), ctx)


def generate(model, tokenizer, texts: list[str], config: Union[GenerationConfig, Mapping[str, Any], None] = None,
             **overrides) -> list[str]:
    """Continue each text; returns only the continuations, decoded, each cut before its first stop string.
    Settings as `generate_ids`."""
    cfg = _resolve(config, overrides)
    return [cut_at_stop(tokenizer.decode(x), cfg.stop) for x in generate_ids(model, tokenizer, texts, cfg)]


def generate_stream(model, tokenizer, text: str, config: Union[GenerationConfig, Mapping[str, Any], None] = None,
                    **overrides) -> Iterator[str]:
    """Continue one text, yielding its continuation in pieces as tokens come; "".join(pieces) == generate(model,
    tokenizer, [text], same settings)[0]. Settings as `generate_ids`.

    A piece is the new decoded text after a token; text that may be the start of a stop string is held back until
    it is known not to be one (a stop string and what follows are never yielded). Beam search (num_beams > 1) knows
    its answer only at the end: it yields it as one piece. The model is in eval mode until the iterator ends or is
    closed; inference mode and autocast are entered per step, never left on between pieces.
    """
    cfg = _resolve(config, overrides)
    if not isinstance(text, str):
        raise CpmantError(f"text must be a string, not {type(text).__name__}",
                          "pass one prompt; generate() continues a list of texts")
    return _stream(model, tokenizer, text, cfg)


def _stream(model, tokenizer, text: str, cfg: GenerationConfig) -> Iterator[str]:
    batch, device, ctx = _prepare(model, tokenizer, [text], cfg)
    was_training = model.training
    model.eval()
    try:
        if cfg.num_beams > 1:
            out = cut_at_stop(tokenizer.decode(_decode(model, tokenizer, batch, cfg, device, ctx)[0]), cfg.stop)
            if out:
                yield out
            return
        s = _Sampler(model, tokenizer, batch, cfg, _generator(cfg, device), ctx)
        ids: list[int] = []
        sent = 0
        while (tok := s.next()) is not None:
            t = int(tok[0])
            if t == tokenizer.eos_id:
                break
            ids.append(t)
            decoded = tokenizer.decode(ids)
            cut = _stop_at(decoded, cfg.stop) if cfg.stop else None
            end = cut if cut is not None else len(decoded) - _held_back(decoded, cfg.stop)
            if end > sent:
                yield decoded[sent:end]
                sent = end
            if cut is not None:
                return
        decoded = tokenizer.decode(ids)  # the held-back tail: no stop string came
        if len(decoded) > sent:
            yield decoded[sent:]
    finally:
        model.train(was_training)
