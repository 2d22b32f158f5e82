"""Text generation as CPM-Ant does it (CPM-Live `generation/ant.py`), with a KV cache.

Input: `[<s>] + encode(text)` with `<unk>` dropped, after the task-2 prompt (prompt ids 2P..3P-1; task 0 when the
model has fewer than 3 prompt types); everything is context, the text is segment 2, the prompt segment 0, positions
0..L-1, span 0. Steps: `</s>` and newline are banned at the first step; pad, `<unk>` and `<s>` at every step
(they decode to nothing); CTRL repetition penalty on the tokens generated so far; stop at `</s>`.

Batching: rows are laid out `[prompt][padding][text]` so every row ends at the same column and the KV cache is one
tensor. Padding gets span 1 (the text has span 0), so no real position attends to it, and positions skip it, so
each row computes exactly what it would alone. Cached decoding equals a full forward in which the generated tokens
are non-context (each sees the past only), which is what CPM-Live's cached `inference` computes.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import CpmantError

PAD_SPAN = 1  # span id of the padding between prompt and text


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


def _extend(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One more column: a context token of segment 2, span 0, at the next position of each row."""
    one = lambda t, v: torch.cat([t, torch.full_like(t[:, :1], v)], dim=1)  # noqa: E731
    return dict(
        context=one(batch["context"], 1),
        position=torch.cat([batch["position"], batch["position"][:, -1:] + 1], dim=1),
        segment=one(batch["segment"], 2),
        span=one(batch["span"], 0),
        length=batch["length"] + 1,
    )


def _repeat(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat_interleave(n, dim=0) for k, v in batch.items()}


def process_logits(logits, seen, step: int, tokenizer, repetition_penalty: float):
    """Bans and CTRL repetition penalty. logits (R, V) fp32, seen (R, V) bool: tokens generated so far."""
    logits = logits.clone()
    logits[:, [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id]] = float("-inf")
    if step == 0:
        logits[:, [tokenizer.eos_id, tokenizer.newline_id]] = float("-inf")
    if repetition_penalty != 1.0:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    return logits


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
def _sample_loop(model, tokenizer, batch, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator):
    B, V = batch["input"].size(0), model.config.vocab_size
    dev = batch["input"].device
    logits, past = model.inference(**batch)  # (B, T, V)
    logits = logits[:, -1]
    seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out: list[list[int]] = [[] for _ in range(B)]
    state = batch
    for step in range(max_new_tokens):
        tok = sample(process_logits(logits, seen, step, tokenizer, repetition_penalty), temperature, top_k, top_p,
                     generator)
        tok = tok.masked_fill(done, tokenizer.pad_id)
        for b in range(B):
            if not done[b] and tok[b] != tokenizer.eos_id:
                out[b].append(int(tok[b]))
        seen[torch.arange(B, device=dev), tok] = True
        done |= tok == tokenizer.eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        state = _extend(state)
        logits, past = model.inference(tok[:, None], past_key_values=past, **state)
        logits = logits[:, -1]
    return out


@torch.no_grad()
def _beam_loop(model, tokenizer, batch, max_new_tokens, num_beams, repetition_penalty, length_penalty=1.0):
    """Beam search (HF-style bookkeeping): 2*num_beams candidates per step, a hypothesis ends at </s>."""
    B, V, nb = batch["input"].size(0), model.config.vocab_size, num_beams
    dev = batch["input"].device
    logits, past = model.inference(**batch)
    idx = torch.arange(B, device=dev).repeat_interleave(nb)
    logits, past, state = logits[:, -1].index_select(0, idx), model.reorder_cache(past, idx), _repeat(batch, nb)
    scores = torch.full((B, nb), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # only the first beam is live at the start
    tokens = torch.zeros(B * nb, 0, dtype=torch.long, device=dev)
    seen = torch.zeros(B * nb, V, dtype=torch.bool, device=dev)
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        logp = F.log_softmax(process_logits(logits, seen, step, tokenizer, repetition_penalty), dim=-1)
        cand = (scores.view(-1, 1) + logp).view(B, nb * V)
        top_scores, top_ids = cand.topk(2 * nb, dim=1)
        next_scores = torch.full((B, nb), float("-inf"), device=dev)
        next_tok = torch.full((B, nb), tokenizer.pad_id, dtype=torch.long, device=dev)
        next_src = torch.arange(B * nb, device=dev).view(B, nb).clone()
        for b in range(B):
            if done[b]:
                continue
            live = 0
            for rank, (s, i) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                beam, t = divmod(i, V)
                if s == float("-inf"):
                    break
                if t == tokenizer.eos_id:
                    if rank < nb:  # an </s> outside the best num_beams candidates is not a hypothesis
                        hyps[b].append((s / (step + 1) ** length_penalty, tokens[b * nb + beam].tolist()))
                    continue
                next_scores[b, live], next_tok[b, live], next_src[b, live] = s, t, b * nb + beam
                live += 1
                if live == nb:
                    break
            hyps[b] = sorted(hyps[b], key=lambda h: -h[0])[:nb]
            best_live = next_scores[b, 0].item() / (step + 1) ** length_penalty
            done[b] = len(hyps[b]) == nb and hyps[b][-1][0] >= best_live
        src = next_src.view(-1)
        tokens = torch.cat([tokens.index_select(0, src), next_tok.view(-1, 1)], dim=1)
        seen = seen.index_select(0, src)
        seen[torch.arange(B * nb, device=dev), next_tok.view(-1)] = True
        scores = next_scores
        if all(done) or step == max_new_tokens - 1:
            break
        past = model.reorder_cache(past, src)
        state = _extend(state)
        logits, past = model.inference(next_tok.view(-1, 1), past_key_values=past, **state)
        logits = logits[:, -1]
    out = []
    for b in range(B):
        if not done[b]:  # out of steps: the live beams compete with the finished ones
            for j in range(nb):
                hyps[b].append((scores[b, j].item() / len(tokens[0]) ** length_penalty, tokens[b * nb + j].tolist()))
        out.append(max(hyps[b], key=lambda h: h[0])[1] if hyps[b] else [])
    return out


def generate(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.2,
    num_beams: int = 1,
    seed: Optional[int] = None,
) -> list[str]:
    """Continue each text; returns only the continuations (decoded). Greedy when temperature == 0.

    num_beams > 1 runs beam search (deterministic; temperature, top_k and top_p must stay at their defaults).
    """
    if not texts:
        return []
    if num_beams < 1 or max_new_tokens < 1:
        raise CpmantError(f"num_beams {num_beams} and max_new_tokens {max_new_tokens} must be >= 1",
                          "pass positive values")
    if repetition_penalty < 1.0:
        raise CpmantError(f"repetition_penalty {repetition_penalty} < 1", "use 1.0 (off) or more, e.g. 1.2")
    if num_beams > 1 and (temperature > 0 or top_k > 0 or top_p < 1.0):
        raise CpmantError("beam search does not sample", "use num_beams=1 to sample, or drop temperature/top_k/top_p")
    config = model.config
    device = next(model.parameters()).device
    batch = build_batch(encode_inputs(tokenizer, texts, config, max_new_tokens), config, device)
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            ids = _beam_loop(model, tokenizer, batch, max_new_tokens, num_beams, repetition_penalty)
        else:
            gen = None
            if seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed)
            ids = _sample_loop(model, tokenizer, batch, max_new_tokens, temperature, top_k, top_p,
                               repetition_penalty, gen)
    finally:
        model.train(was_training)
    return [tokenizer.decode(x) for x in ids]
