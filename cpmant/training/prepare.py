"""Corpus -> vocab -> encoded documents, each step cached under CPMANT_HOME by content hash."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import get_preset
from ..corpus import load_corpus
from ..encode import encode_documents
from ..paths import subdir
from ..tokenizer import CPMAntTokenizer, build_vocab


@dataclass
class PreparedData:
    corpus_name: str
    data_sha256: str
    vocab_path: Path
    vocab_sha256: str
    corpus_stats: dict
    train_docs: list[np.ndarray] = field(repr=False)
    valid_docs: list[np.ndarray] = field(repr=False)
    corpus_path: str | None = None  # the corpus folder as an absolute path; None = the default, fortunes-zh
    vocab_size: int | None = None  # the vocab size asked for when it was built (None = the preset's)
    valid_fraction: float | None = None
    seed: int | None = None

    @property
    def train_tokens(self) -> int:
        return int(sum(len(d) for d in self.train_docs))

    @property
    def valid_tokens(self) -> int:
        return int(sum(len(d) for d in self.valid_docs))

    def summary(self) -> dict:
        return {
            "corpus": self.corpus_name,
            "data_sha256": self.data_sha256,
            "vocab_sha256": self.vocab_sha256,
            "vocab_path": str(self.vocab_path),
            "train_docs": len(self.train_docs),
            "valid_docs": len(self.valid_docs),
            "train_tokens": self.train_tokens,
            "valid_tokens": self.valid_tokens,
            **{f"corpus_{k}": v for k, v in self.corpus_stats.items() if isinstance(v, (int, float, str))},
        }

    def spec(self, min_piece_tokens: int, max_piece_tokens: int) -> dict:
        """What a later stage needs to read the same data: written as meta["data"] into the model folder."""
        return {"corpus": self.corpus_path, "corpus_name": self.corpus_name, "valid_fraction": self.valid_fraction,
                "seed": self.seed, "data_sha256": self.data_sha256, "vocab_size": self.vocab_size,
                "min_piece_tokens": min_piece_tokens, "max_piece_tokens": max_piece_tokens}


def prepare_data(corpus: str | None, preset: str, vocab_size: int | None = None, valid_fraction: float = 0.05,
                 seed: int = 0, encode_workers: int | None = None, progress: bool = True) -> PreparedData:
    """Load the corpus (None = fortunes-zh), build or reuse its vocab, encode both splits (cached)."""
    c = load_corpus(Path(corpus) if corpus else None, valid_fraction=valid_fraction, seed=seed)
    size = vocab_size or get_preset(preset).vocab_size
    vocab_dir = subdir("vocab", f"{c.sha256[:16]}-{size}")
    vocab_path = vocab_dir / "vocab.txt"
    if not vocab_path.exists():
        build_vocab(c.train, size, vocab_path)
    tok = CPMAntTokenizer(vocab_path)
    cache = subdir("cache", "encoded")
    train = encode_documents(list(c.train), vocab_path, cache_dir=cache, num_workers=encode_workers,
                             progress=progress)
    valid = encode_documents(list(c.valid), vocab_path, cache_dir=cache, num_workers=encode_workers,
                             progress=progress)
    return PreparedData(c.name, c.sha256, vocab_path, tok.vocab_sha256, dict(c.stats), train, valid,
                        corpus_path=str(Path(corpus).expanduser().resolve()) if corpus else None,
                        vocab_size=vocab_size, valid_fraction=valid_fraction, seed=seed)
