"""Data lineage: which corpus, split and piece settings a checkpoint was trained with, and loading exactly that data.

A pretrained model folder's metadata holds `data` = {corpus (absolute path, or None for fortunes-zh), corpus_name,
valid_fraction, seed, data_sha256, vocab_size, min_piece_tokens, max_piece_tokens, heldout}; every later stage
(compression now; delta tuning and validation next) copies it into its own metadata, so a variant of a variant still
knows it. `heldout` is the held-out measure's spec (HeldOutSpec below, measured by cpmant.heldout), fixed
for the lineage; folders written before it was recorded get HeldOutSpec's defaults.
Older checkpoints without `data` fall back to the folder's `training_config.yaml` and the metadata's `data_sha256`.

`load_lineage_data` re-reads the corpus, recomputes its hash and refuses data that differs from what the parent
saw (the corpus changed or moved), then encodes both splits with the parent folder's own vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import META_FILE, VOCAB_FILE, read_meta
from .errors import CpmantError

TRAINING_CONFIG_FILE = "training_config.yaml"
DEFAULT_CORPUS_NAME = "fortunes-zh"


@dataclass(frozen=True)
class HeldOutSpec:
    """How many held-out rows of how many positions, in batches of how many (fixed per lineage)."""

    seq_len: int = 128  # PretrainConfig's defaults: what a folder that records no spec is measured with
    rows: int = 64
    batch_size: int = 16

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, d: dict | None) -> "HeldOutSpec":
        """The spec a metadata entry records; the defaults for a folder written before it was recorded."""
        if not isinstance(d, dict):
            return cls()
        base = cls()
        return cls(seq_len=int(d.get("seq_len", base.seq_len)), rows=int(d.get("rows", base.rows)),
                   batch_size=int(d.get("batch_size", base.batch_size)))

    @classmethod
    def of_pretraining(cls, cfg) -> "HeldOutSpec":
        """The spec a pretraining run records: its seq_len, eval_rows and micro_batch_size."""
        return cls(seq_len=int(cfg.seq_len), rows=int(cfg.eval_rows), batch_size=int(cfg.micro_batch_size))


@dataclass(frozen=True)
class DataLineage:
    corpus: str | None  # absolute path of the corpus folder or file; None = the default, fortunes-zh
    corpus_name: str
    valid_fraction: float
    seed: int
    data_sha256: str
    vocab_size: int | None
    min_piece_tokens: int
    max_piece_tokens: int
    heldout: HeldOutSpec = HeldOutSpec()  # the held-out measure's rows (cpmant/heldout.py)

    def to_meta(self) -> dict:
        """The `data` entry of a checkpoint's metadata."""
        return asdict(self)

    @property
    def where(self) -> str:
        return self.corpus or f"the default corpus ({DEFAULT_CORPUS_NAME})"


def read_lineage(model_dir: str | Path) -> DataLineage:
    """The data a model folder was trained with: its metadata's `data`, else its training_config.yaml."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    d = meta.get("data")
    if isinstance(d, dict) and d.get("data_sha256"):
        corpus = d.get("corpus")
        return DataLineage(
            corpus=str(corpus) if corpus else None,
            corpus_name=str(d.get("corpus_name") or (Path(corpus).name if corpus else DEFAULT_CORPUS_NAME)),
            valid_fraction=float(d["valid_fraction"]), seed=int(d["seed"]), data_sha256=str(d["data_sha256"]),
            vocab_size=None if d.get("vocab_size") is None else int(d["vocab_size"]),
            min_piece_tokens=int(d.get("min_piece_tokens", 8)), max_piece_tokens=int(d.get("max_piece_tokens", 990)),
            heldout=HeldOutSpec.from_meta(d.get("heldout")))
    tc = model_dir / TRAINING_CONFIG_FILE
    if tc.is_file() and meta.get("data_sha256"):
        import yaml

        cfg = yaml.safe_load(tc.read_text(encoding="utf-8")) or {}
        corpus = cfg.get("corpus")
        corpus = str(Path(corpus).expanduser().resolve()) if corpus else None
        return DataLineage(
            corpus=corpus, corpus_name=Path(corpus).name if corpus else DEFAULT_CORPUS_NAME,
            valid_fraction=float(cfg.get("valid_fraction", 0.05)), seed=int(cfg.get("seed", 0)),
            data_sha256=str(meta["data_sha256"]), vocab_size=cfg.get("vocab_size"),
            min_piece_tokens=int(cfg.get("min_piece_tokens", 8)),
            max_piece_tokens=int(cfg.get("max_piece_tokens", 990)))  # heldout: the defaults, as its old variants
    raise CpmantError(
        f"{model_dir} does not say which data it was trained with (no `data` in {META_FILE}, "
        f"no {TRAINING_CONFIG_FILE})",
        "use a model pretrained by cpmant (its folder records the corpus), or a variant made from one",
    )


@dataclass
class LineageData:
    lineage: DataLineage
    vocab_path: Path
    train: list[np.ndarray] = field(repr=False)  # the parent's training documents, encoded
    valid: list[np.ndarray] = field(repr=False)  # the parent's held-out documents, encoded
    train_texts: tuple[str, ...] = field(repr=False, default=())
    valid_texts: tuple[str, ...] = field(repr=False, default=())


def load_lineage_data(model_dir: str | Path, progress: bool = True) -> LineageData:
    """The corpus `model_dir` was trained with, split as it was, encoded with its own vocab; a CpmantError when the
    corpus's hash is not the recorded one."""
    from .corpus import load_corpus
    from .encode import encode_documents
    from .paths import rehome, subdir

    model_dir = Path(model_dir)
    lin = read_lineage(model_dir)
    vocab = model_dir / VOCAB_FILE
    if not vocab.is_file():
        raise CpmantError(f"{model_dir} has no {VOCAB_FILE}", "copy the vocab the model was trained with into it")
    corpus = rehome(lin.corpus) if lin.corpus else None  # a corpus inside a home that moved is found there
    if corpus is not None and not corpus.exists():
        raise CpmantError(f"the corpus {lin.corpus} that {model_dir} was trained with no longer exists",
                          f"put the corpus back at {lin.corpus} (it moved?), or pretrain a new model on its new place")
    c = load_corpus(corpus, valid_fraction=lin.valid_fraction, seed=lin.seed)
    if c.sha256 != lin.data_sha256:
        raise CpmantError(
            f"the corpus at {lin.where} is not the data {model_dir} was trained with: data_sha256 {c.sha256[:16]}... "
            f"differs from the recorded {lin.data_sha256[:16]}... (the corpus changed, or another corpus now sits "
            "at that path)",
            f"restore the corpus the model was trained with at {lin.where}, or pretrain a new model on this one",
        )
    cache = subdir("cache", "encoded")
    train = encode_documents(list(c.train), vocab, cache_dir=cache, progress=progress)
    valid = encode_documents(list(c.valid), vocab, cache_dir=cache, progress=progress)
    return LineageData(lin, vocab, train, valid, c.train, c.valid)
