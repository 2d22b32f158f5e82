"""Smoke checks of one generation (pure functions, no torch): non-empty, valid UTF-8, no `<unk>`, no degenerate
repetition loop.

A loop is a tandem repeat of generated ids: some n-gram (1 <= n <= `max_ngram` tokens) appearing back to back more
than `max_repeats` times ("的的的的" is the 1-gram 的 four times; "月光月光月光月光" the 2-gram 月光 four times).
Written by hand: no kept library has a tandem-repeat check over token ids (transformers' no_repeat_ngram_size
bans repeats while generating; it does not detect them afterwards).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..tokenizer import SPECIAL_TOKENS

REPLACEMENT_CHAR = "\ufffd"


def find_loop(ids: list[int], max_ngram: int = 4, max_repeats: int = 3,
              ignore: frozenset[int] = frozenset()) -> tuple[int, int, int] | None:
    """The first degenerate loop in `ids` as (n, start, repeats): an n-gram repeated back to back more than
    `max_repeats` times; None when there is none. The shortest n wins at a given start. An n-gram made only of
    `ignore` ids (whitespace: the corpus's own layout, e.g. fortunes-zh's indented "     -- 李白《...》") is
    no loop."""
    ids = list(ids)
    L = len(ids)
    for start in range(L):
        for n in range(1, max_ngram + 1):
            if start + n * (max_repeats + 1) > L:
                break
            gram = ids[start:start + n]
            if ignore and all(i in ignore for i in gram):
                continue
            reps, pos = 1, start + n
            while pos + n <= L and ids[pos:pos + n] == gram:
                reps += 1
                pos += n
            if reps > max_repeats:
                return n, start, reps
    return None


def valid_utf8(text: str) -> bool:
    """The text encodes to UTF-8 (no lone surrogates) and holds no U+FFFD (a byte sequence that did not decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return REPLACEMENT_CHAR not in text


@dataclass(frozen=True)
class SmokeResult:
    prompt: str
    text: str
    tokens: int
    nonempty: bool
    valid_utf8: bool
    unk_tokens: int
    loop: str  # "" or e.g. "2-gram x5 at token 3"

    @property
    def passed(self) -> bool:
        return self.nonempty and self.valid_utf8 and self.unk_tokens == 0 and not self.loop

    @property
    def problems(self) -> list[str]:
        out = []
        if not self.nonempty:
            out.append("empty")
        if not self.valid_utf8:
            out.append("invalid UTF-8")
        if self.unk_tokens:
            out.append(f"{self.unk_tokens} <unk>")
        if self.loop:
            out.append(f"loop ({self.loop})")
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "problems": self.problems}


# the space and newline tokens (</_>, </n>): runs of them are layout, not a degenerate loop
WHITESPACE_IDS = frozenset(SPECIAL_TOKENS.index(t) for t in ("</_>", "</n>"))


def smoke_check(prompt: str, ids: list[int], text: str, unk_id: int, max_ngram: int = 4,
                max_repeats: int = 3) -> SmokeResult:
    loop = find_loop(ids, max_ngram, max_repeats, ignore=WHITESPACE_IDS)
    return SmokeResult(prompt=prompt, text=text, tokens=len(ids), nonempty=bool(text.strip()),
                       valid_utf8=valid_utf8(text), unk_tokens=sum(1 for i in ids if i == unk_id),
                       loop="" if loop is None else f"{loop[0]}-gram x{loop[2]} at token {loop[1]}")


def smoke_summary(results: list[SmokeResult]) -> dict[str, float]:
    """Rates over the generations: smoke_pass_rate, empty_rate, loop_rate, invalid_utf8_rate, unk_rate (share of
    generated tokens that are <unk>)."""
    n = max(len(results), 1)
    tokens = sum(r.tokens for r in results)
    return {"smoke_pass_rate": sum(r.passed for r in results) / n,
            "empty_rate": sum(not r.nonempty for r in results) / n,
            "loop_rate": sum(bool(r.loop) for r in results) / n,
            "invalid_utf8_rate": sum(not r.valid_utf8 for r in results) / n,
            "unk_rate": sum(r.unk_tokens for r in results) / max(tokens, 1)}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation (numpy's default method)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")
