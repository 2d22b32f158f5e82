"""The one held-out measure of a model: left-to-right LM loss and perplexity on a fixed set of held-out rows, the
same for pretraining's final (and periodic) evaluation, every rung of the compression ladder and validation.

Which rows: the documents of the parent's held-out split that compression does not use to choose what to prune
(importance and calibration read documents 0, 2, 4, ...; this measure reads documents 1, 3, 5, ...; a held-out
split of one document, which compression refuses, is measured whole). Rows are packed with the lineage's piece
settings and seed, every piece scored as a left-to-right LM piece (cpmant.training.evaluate), the first `rows` rows
of the stream's seeded order, `seq_len` positions each (capped by the model's position range), `batch_size` rows per
forward pass, always in fp32 on the model's device.

`HeldOutSpec` (seq_len, rows, batch_size) is fixed per lineage: pretraining records it in the model folder's
metadata (`data.heldout`, cpmant.lineage.DataLineage: its seq_len, eval_rows and micro_batch_size) and every later
stage reads it from there; folders without it get `HeldOutSpec()`'s defaults.

`heldout_sha256` names the rows (data hash, vocab hash, spec, seed, piece settings, the half, the precision): two
measurements compare only when it is the same.

    heldout_loss(model, model_dir_or_lineage_data) -> {"lm_loss", "perplexity", "tokens"}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .hashing import sha256_file, sha256_json
from .lineage import HeldOutSpec, load_lineage_data, read_lineage

PRECISION = "fp32"  # the measure's precision, whatever the stage's own (bf16 autocast changes the loss)
HALF = "valid[1::2]"  # the documents measured (named in the identity)
VERSION = 1  # bump when the rows or the loss computation change


def measured_docs(valid: list) -> list:
    """The held-out documents the measure reads: 1, 3, 5, ... (0, 2, 4, ... choose what compression prunes); all of
    a one-document split (compression refuses one, so nothing is chosen on it)."""
    return list(valid[1::2]) if len(valid) >= 2 else list(valid)


def calibration_docs(valid: list) -> list:
    """The held-out documents compression may use for importance and calibration: 0, 2, 4, ..."""
    return list(valid[0::2])


def heldout_sha256(data_sha256: str, vocab_sha256: str, spec: HeldOutSpec, seed: int, min_piece_tokens: int,
                   max_piece_tokens: int) -> str:
    """The identity of the held-out rows (and of how they are scored)."""
    obj = {"data_sha256": data_sha256, "vocab_sha256": vocab_sha256, "spec": spec.to_meta(), "seed": seed,
           "min_piece_tokens": min_piece_tokens, "max_piece_tokens": max_piece_tokens, "half": HALF,
           "precision": PRECISION, "version": VERSION}
    return sha256_json(obj)


@dataclass
class HeldOutRows:
    """The measured held-out documents of one lineage with everything that makes their rows."""

    docs: list[np.ndarray] = field(repr=False)  # the measured half (measured_docs)
    spec: HeldOutSpec
    seed: int
    min_piece_tokens: int
    max_piece_tokens: int
    data_sha256: str
    vocab_sha256: str
    _streams: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        return heldout_sha256(self.data_sha256, self.vocab_sha256, self.spec, self.seed, self.min_piece_tokens,
                              self.max_piece_tokens)

    @classmethod
    def from_lineage_data(cls, d) -> "HeldOutRows":
        """The rows of a cpmant.lineage.LineageData (its held-out split, its recorded spec, its vocab)."""
        lin = d.lineage
        return cls(measured_docs(d.valid), lin.heldout, lin.seed, lin.min_piece_tokens, lin.max_piece_tokens,
                   lin.data_sha256, sha256_file(d.vocab_path))

    def stream(self, config):
        """The PretrainStream of these rows for a model config (cached per config)."""
        from .tokenizer import BOS_ID, EOS_ID
        from .training.data import PretrainStream

        seq_len = min(self.spec.seq_len, config.position_bias_max_distance)
        key = (seq_len, config.prompt_length, config.vocab_size, config.prompt_types)
        if key not in self._streams:
            self._streams[key] = PretrainStream(
                self.docs, config, seq_len, bos=BOS_ID, eos=EOS_ID, min_piece_tokens=self.min_piece_tokens,
                max_piece_tokens=self.max_piece_tokens, seed=self.seed, split="held-out split (measured half)")
        return self._streams[key]


def heldout_rows(source) -> HeldOutRows:
    """HeldOutRows from a model folder (its data lineage, loaded and hash-checked), a LineageData, or as is."""
    if isinstance(source, HeldOutRows):
        return source
    if isinstance(source, (str, Path)):
        source = load_lineage_data(source, progress=False)
    return HeldOutRows.from_lineage_data(source)


def heldout_loss(model, source) -> dict:
    """{"lm_loss", "perplexity", "tokens"} of `model` on the held-out rows of `source` (a model folder, a
    LineageData or HeldOutRows), in fp32."""
    from .training.evaluate import evaluate

    rows = heldout_rows(source)
    ev = evaluate(model, rows.stream(model.config), rows.spec.rows, rows.spec.batch_size, PRECISION)
    return {"lm_loss": ev["valid_loss"], "perplexity": ev["valid_perplexity"], "tokens": ev["valid_tokens"]}


def folder_heldout_sha256(model_dir: str | Path) -> str:
    """heldout_sha256 of the rows a model folder's lineage names (its metadata and vocab; no data is read)."""
    from .checkpoint import VOCAB_FILE

    lin = read_lineage(model_dir)
    return heldout_sha256(lin.data_sha256, sha256_file(Path(model_dir) / VOCAB_FILE), lin.heldout, lin.seed,
                          lin.min_piece_tokens, lin.max_piece_tokens)
