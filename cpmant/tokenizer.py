"""The CPM-Ant tokenizer (jieba words, then greedy longest match over vocab.txt) and a vocab builder.

Ids equal transformers' `CpmAntTokenizer(vocab).encode(text, add_special_tokens=False)` (4.45.2) on any text that
does not contain the literal strings "<s>", "</s>", "<pad>" or "<unk>": transformers cuts those out of the text as
special tokens, while this tokenizer, like the original CPM-Live code, treats them as plain characters (so text can
never inject control ids); it equals transformers with `split_special_tokens=True` on all text.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

with warnings.catch_warnings():  # jieba 0.42 imports pkg_resources, which setuptools 80 (OpenDelta's) warns about
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import jieba

from .errors import CpmantError
from .fsutil import atomic_write_text
from .hashing import sha256_file

jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." noise

TOKENIZER_VERSION = 1  # bump when tokenization changes: it keys the encode cache
SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<d>", "</d>")
# ids of the special tokens: their place in SPECIAL_TOKENS, which opens every vocab.txt (the one home of these ids)
PAD_ID, UNK_ID, MASK_ID, SEP_ID = 0, 1, 2, 3
BOS_ID, EOS_ID = SPECIAL_TOKENS.index("<s>"), SPECIAL_TOKENS.index("</s>")
SENTINELS = tuple(f"<s{i}>" for i in range(59))  # <s0>..<s58>, at the end of the vocab
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(SENTINELS) + 1  # the specials plus at least one real token
MAX_INPUT_CHARS_PER_WORD = 200  # a longer jieba word becomes one <unk>, as in transformers
MAX_VOCAB_WORD_CHARS = 16  # build_vocab adds no longer words


@lru_cache(maxsize=1)
def _jieba() -> jieba.Tokenizer:
    """A private jieba instance with the default dictionary (same cuts as `jieba.cut`, immune to add_word)."""
    tok = jieba.Tokenizer()
    tok.initialize()
    return tok


def jieba_cut(text: str) -> list[str]:
    """jieba's accurate mode with HMM, exactly `list(jieba.cut(text, cut_all=False))`."""
    return list(_jieba().cut(text, cut_all=False, HMM=True))


class CPMAntTokenizer:
    """vocab.txt (UTF-8, one token per line, id = line number) with CPM-Ant's special ids."""

    def __init__(self, vocab_path: str | os.PathLike):
        self.vocab_path = Path(vocab_path).expanduser()
        rebuild = "rebuild it with `cpmant.tokenizer.build_vocab(texts, vocab_size, out_path)`"
        if not self.vocab_path.is_file():
            raise CpmantError(f"vocab file {self.vocab_path} does not exist", f"check the path, or {rebuild}")
        try:
            # Text mode and readlines(), as transformers' load_vocab: "\r" also ends a line.
            with open(self.vocab_path, encoding="utf-8") as f:
                self.decoder: list[str] = [line.rstrip("\n") for line in f.readlines()]
        except UnicodeDecodeError as e:
            raise CpmantError(f"vocab file {self.vocab_path} is not UTF-8 (byte {e.start})", rebuild) from None
        self.vocab_size = len(self.decoder)
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise CpmantError(
                f"vocab {self.vocab_path} has {self.vocab_size} tokens; the specials alone need "
                f"{len(SPECIAL_TOKENS)} + {len(SENTINELS)} and a usable vocab at least {MIN_VOCAB_SIZE}",
                f"{rebuild} with a larger vocab_size (at least {MIN_VOCAB_SIZE}, e.g. 6000)",
            )
        wrong = [f"id {i} is {self.decoder[i]!r}, not {t!r}" for i, t in enumerate(SPECIAL_TOKENS)
                 if self.decoder[i] != t]
        if wrong:
            raise CpmantError(f"vocab {self.vocab_path} has specials at the wrong ids: {'; '.join(wrong)}", rebuild)
        present = set(self.decoder)
        missing = [s for s in SENTINELS if s not in present]
        if missing:
            raise CpmantError(f"vocab {self.vocab_path} lacks {len(missing)} of <s0>..<s58> (first {missing[0]})",
                              rebuild)
        # As transformers: later duplicates win; " " and "\n" stand for </_> and </n>, which leave the encoder.
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(self.decoder)}
        self.encoder[" "] = self.encoder.pop("</_>")
        self.encoder["\n"] = self.encoder.pop("</n>")
        self.max_token_chars = max(len(t) for t in self.encoder)
        self.vocab_sha256 = sha256_file(self.vocab_path)
        self.pad_id, self.unk_id, self.mask_id, self.sep_id = PAD_ID, UNK_ID, MASK_ID, SEP_ID
        self.newline_id, self.space_id, self.bos_id, self.eos_id = 4, 5, BOS_ID, EOS_ID
        self.bod_id, self.eod_id = 8, 9
        self._skip_on_decode = {self.pad_id, self.bos_id, self.eos_id}

    def __repr__(self) -> str:
        return f"CPMAntTokenizer({str(self.vocab_path)!r}, vocab_size={self.vocab_size})"

    def _wordpiece(self, word: str) -> list[str]:
        """Greedy longest match, as transformers' WordpieceTokenizer, bounded by the longest vocab token."""
        if word in self.encoder:
            return [word]
        n = len(word)
        if n > MAX_INPUT_CHARS_PER_WORD:
            return ["<unk>"]
        out, start, enc, longest = [], 0, self.encoder, self.max_token_chars
        while start < n:
            end = min(n, start + longest)
            while end > start and word[start:end] not in enc:
                end -= 1
            if end == start:
                out.append("<unk>")
                start += 1
            else:
                out.append(word[start:end])
                start = end
        return out

    def tokenize(self, text: str) -> list[str]:
        """Token strings; " " and "\\n" appear as themselves (ids of </_> and </n>), unknowns as "<unk>"."""
        out: list[str] = []
        for word in _jieba().cut(text, cut_all=False, HMM=True):
            out.extend(self._wordpiece(word))
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of the text, no <s> or </s> added; unknown characters give unk_id."""
        enc, unk = self.encoder, self.unk_id
        return [enc.get(t, unk) for t in self.tokenize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids: pad, <s>, </s> and negative ids are skipped; </n> is "\\n", </_> is " "."""
        parts = []
        for i in ids:
            i = int(i)
            if i < 0 or i in self._skip_on_decode:
                continue
            if i == self.newline_id:
                parts.append("\n")
            elif i == self.space_id:
                parts.append(" ")
            else:
                parts.append(self.decoder[i] if i < self.vocab_size else "<unk>")
        return "".join(parts)


def build_vocab(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> Path:
    """Write a vocab.txt of exactly vocab_size lines built from texts; returns out_path.

    Order: the 10 specials; every character of the texts by frequency (ties by code point); the most frequent jieba
    words of 2..16 characters (ties by string); `<unusedN>` fillers if the texts run out of words; `<s0>`..`<s58>`.
    " " and "\\n" are never plain tokens (they are </_> and </n>), nor "\\r" (it would end a line in vocab.txt).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise CpmantError(
            f"vocab_size {vocab_size} is too small: the specials take {len(SPECIAL_TOKENS)} + {len(SENTINELS)} ids",
            f"use vocab_size >= {MIN_VOCAB_SIZE} (the tiny preset uses 6000)",
        )
    out_path = Path(out_path).expanduser()
    budget = vocab_size - len(SPECIAL_TOKENS) - len(SENTINELS)
    chars: Counter[str] = Counter()
    words: Counter[str] = Counter()
    tok = _jieba()
    for text in texts:
        chars.update(text)
        words.update(w for w in tok.cut(text, cut_all=False, HMM=True) if 2 <= len(w) <= MAX_VOCAB_WORD_CHARS)
    reserved = set(SPECIAL_TOKENS) | set(SENTINELS)
    banned = {" ", "\n", "\r"}
    char_list = sorted((c for c in chars if c not in banned and c not in reserved), key=lambda c: (-chars[c], c))
    if len(char_list) > budget:
        warnings.warn(
            f"build_vocab: the texts have {len(char_list)} distinct characters but vocab_size {vocab_size} leaves "
            f"room for {budget}; the {len(char_list) - budget} rarest become <unk> (raise vocab_size to keep them)",
            stacklevel=2,
        )
        char_list = char_list[:budget]
    # A word with a space, newline or other whitespace could never come out of jieba's cut as one piece.
    word_list = sorted((w for w in words if not any(c.isspace() for c in w) and w not in reserved),
                       key=lambda w: (-words[w], w))[: budget - len(char_list)]
    tokens = [*SPECIAL_TOKENS, *char_list, *word_list]
    # Fillers keep the file at exactly vocab_size lines; jieba never yields "<" with letters, so they never match.
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(SENTINELS) - len(tokens))]
    tokens += SENTINELS
    assert len(tokens) == vocab_size and len(set(tokens)) == vocab_size
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, "".join(t + "\n" for t in tokens))
    return out_path
