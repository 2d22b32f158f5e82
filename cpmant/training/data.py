"""Pretraining rows in CPM-Ant's format: pieces packed with span ids, two objectives, random access by index.

A piece is `<s> + tokens + </s>` (documents longer than max_piece_tokens are cut into several pieces; pieces shorter
than min_piece_tokens are dropped). Pieces are packed greedily into rows of `seq_len - prompt_length` text positions;
`span` numbers the pieces so they never attend to each other. Every row starts with one task prompt:

- task 1, mask-and-predict: a random subset of each piece's tokens is non-context (prompt ids 1*P .. 2*P-1, segment 1);
- task 2, left-to-right LM: a random-length suffix of each piece is non-context (prompt ids 2*P .. 3*P-1, segment 2).

The target at position i is the token at i+1 when position i+1 is non-context, else -100.
Row i of the stream is a pure function of (seed, i): resuming at a step needs only the step number, and several
processes reading disjoint slices of one global batch see exactly what one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CpmantError

IGNORE = -100
TASK_MASK, TASK_LM = 1, 2


def make_pieces(docs: list[np.ndarray], bos: int, eos: int, min_tokens: int, max_tokens: int) -> list[np.ndarray]:
    """Cut documents into `<s> tokens </s>` pieces of at most max_tokens; drop those under min_tokens."""
    body = max_tokens - 2
    pieces = []
    for doc in docs:
        for start in range(0, len(doc), body):
            chunk = doc[start : start + body]
            if len(chunk) + 2 < min_tokens:
                continue
            pieces.append(np.concatenate(([bos], chunk, [eos])).astype(np.int64))
    return pieces


def pack(pieces: list[np.ndarray], row_len: int) -> list[list[np.ndarray]]:
    """First-fit packing in order: a row is a list of pieces whose lengths sum to at most row_len."""
    rows: list[list[np.ndarray]] = []
    cur: list[np.ndarray] = []
    used = 0
    for p in pieces:
        if used + len(p) > row_len and cur:
            rows.append(cur)
            cur, used = [], 0
        cur.append(p[:row_len])
        used += len(cur[-1])
    if cur:
        rows.append(cur)
    return rows


@dataclass
class Batch:
    input: torch.Tensor  # (B, T) prompt ids then token ids
    length: torch.Tensor  # (B,)
    context: torch.Tensor  # (B, T) bool
    position: torch.Tensor  # (B, T)
    segment: torch.Tensor  # (B, T)
    span: torch.Tensor  # (B, T)
    target: torch.Tensor  # (B, T) next-token targets or -100
    task: torch.Tensor  # (B,) 1 or 2

    def to(self, device: torch.device | str) -> "Batch":
        if torch.device(device).type == "cpu":
            return self
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return dict(input=self.input, length=self.length, context=self.context, position=self.position,
                    segment=self.segment, span=self.span)

    @property
    def num_targets(self) -> int:
        return int((self.target != IGNORE).sum())


class PretrainStream:
    """An endless, deterministic stream of rows over packed pieces, epoch by epoch in a seeded order."""

    def __init__(self, docs: list[np.ndarray], config: ModelConfig, seq_len: int, *, bos: int, eos: int,
                 min_piece_tokens: int = 8, max_piece_tokens: int = 990, lm_share: float = 0.5,
                 mask_ratio: tuple[float, float] = (0.15, 0.5), seed: int = 0):
        if seq_len > config.position_bias_max_distance:
            raise CpmantError(
                f"seq_len {seq_len} is longer than the model's position range "
                f"(position_bias_max_distance={config.position_bias_max_distance})",
                "lower seq_len, or use a preset with a larger position_bias_max_distance",
            )
        if config.prompt_types < 3:
            raise CpmantError(f"prompt_types={config.prompt_types} leaves no room for tasks 1 and 2",
                              "use a model config with prompt_types >= 3")
        self.config = config
        self.seq_len = seq_len
        self.row_len = seq_len - config.prompt_length
        if self.row_len < min_piece_tokens:
            raise CpmantError(f"seq_len {seq_len} leaves {self.row_len} text positions after the prompt",
                              f"raise seq_len above prompt_length + {min_piece_tokens}")
        pieces = make_pieces(docs, bos, eos, min_piece_tokens, min(max_piece_tokens, self.row_len))
        if not pieces:
            raise CpmantError("the corpus gives no training piece (every document is shorter than "
                              f"min_piece_tokens={min_piece_tokens} tokens)",
                              "add text to the corpus or lower min_piece_tokens")
        self.rows = pack(pieces, self.row_len)
        self.lm_share = lm_share
        self.mask_ratio = mask_ratio
        self.seed = seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens_per_epoch(self) -> int:
        return sum(len(p) for r in self.rows for p in r)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return self._perm_cache[epoch]

    def row(self, index: int, shuffle: bool = True, task: int | None = None) -> dict[str, np.ndarray]:
        """Row `index` of the stream as numpy arrays (one row, length seq_len)."""
        n = len(self.rows)
        epoch, k = divmod(index, n)
        row_id = int(self._perm(epoch)[k]) if shuffle else k
        rng = np.random.default_rng([self.seed, epoch, row_id, 7])
        if task is None:
            task = TASK_LM if rng.random() < self.lm_share else TASK_MASK
        P, T = self.config.prompt_length, self.seq_len
        inp = np.zeros(T, np.int64)
        context = np.ones(T, bool)
        position = np.zeros(T, np.int64)
        segment = np.zeros(T, np.int64)
        span = np.zeros(T, np.int64)
        target = np.full(T, IGNORE, np.int64)
        inp[:P] = task * P + np.arange(P)
        position[:P] = np.arange(P)
        pos = P
        for s, piece in enumerate(self.rows[row_id]):
            L = len(piece)
            sl = slice(pos, pos + L)
            inp[sl] = piece
            position[sl] = P + np.arange(L)
            segment[sl] = task
            span[sl] = s
            if task == TASK_LM:
                cut = int(rng.integers(1, L))  # positions >= cut are predicted; <s> always stays context
                nc = np.arange(L) >= cut
            else:
                ratio = rng.uniform(*self.mask_ratio)
                nc = rng.random(L) < ratio
                nc[0] = False
                if not nc.any():
                    nc[int(rng.integers(1, L))] = True
            context[sl] = ~nc
            # target at i is token i+1 when i+1 is non-context (both inside this piece)
            tgt = np.full(L, IGNORE, np.int64)
            tgt[:-1] = np.where(nc[1:], piece[1:], IGNORE)
            target[sl] = tgt
            pos += L
        length = pos
        return dict(input=inp, length=np.int64(length), context=context, position=position, segment=segment,
                    span=span, target=target, task=np.int64(task))

    def batch(self, indices, shuffle: bool = True, task: int | None = None) -> Batch:
        rows = [self.row(i, shuffle=shuffle, task=task) for i in indices]
        st = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        return Batch(**st)
