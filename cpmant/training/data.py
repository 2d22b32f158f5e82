"""Pretraining rows in CPM-Ant's format: pieces packed with span ids, each with its own task prompt, two objectives.

A piece is `<s> + tokens + </s>` (documents longer than max_piece_tokens are cut into several pieces; pieces shorter
than min_piece_tokens are dropped). As CPM-Live packs (`pretrain_cpm_ant.py` BatchPacker over
`CPMAntPretrainDataset` samples), every packed piece is a whole sample: its task prompt (prompt_length positions)
followed by its text, all with the piece's own span id, so the piece attends to its own prompt and to nothing of the
other pieces. Pieces and their prompts are packed greedily into rows of seq_len positions. For each piece:

- input: prompt ids task*P .. task*P+P-1, then the piece's token ids (P = prompt_length);
- position: 0 .. P-1 on the prompt, P .. P+len-1 on the text (positions restart with every piece);
- segment: 0 on the prompt, the task on the text; span: the piece's index in the row; context: True on the prompt;
- task 1, mask-and-predict: a random subset of the piece's tokens is non-context (never its `<s>`);
- task 2, left-to-right LM: a random-length suffix of the piece is non-context.

Each piece draws its own task (LM with probability lm_share), as CPM-Live's samples each carry their own task.
The target at position i is the token at i+1 when position i+1 is non-context in the same piece, else -100.
As in CPM-Live, the model looks up only the row's first prompt_length positions in the prompt table: the prompts of
later pieces are read through the token table (their ids task*P+k are fed as they are), exactly what CPM-Live's
model sees on its packed rows.

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


def pack(pieces: list[np.ndarray], row_len: int, overhead: int = 0) -> list[list[np.ndarray]]:
    """Greedy packing in order: a row is a list of pieces whose lengths, each plus `overhead` positions (its
    prompt), sum to at most row_len. A piece longer than row_len - overhead is cut to fit."""
    room = row_len - overhead
    rows: list[list[np.ndarray]] = []
    cur: list[np.ndarray] = []
    used = 0
    for p in pieces:
        p = p[:room]
        if used + len(p) + overhead > row_len and cur:
            rows.append(cur)
            cur, used = [], 0
        cur.append(p)
        used += len(p) + overhead
    if cur:
        rows.append(cur)
    return rows


@dataclass
class Batch:
    input: torch.Tensor  # (B, T) prompt ids and token ids, piece after piece
    length: torch.Tensor  # (B,)
    context: torch.Tensor  # (B, T) bool
    position: torch.Tensor  # (B, T)
    segment: torch.Tensor  # (B, T)
    span: torch.Tensor  # (B, T)
    target: torch.Tensor  # (B, T) next-token targets or -100
    task: torch.Tensor  # (B, T) the task of each position's piece (1 or 2), 0 on padding

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
    """An endless, deterministic stream of rows over packed pieces, epoch by epoch in a seeded order.

    `split` names the documents in error messages ("training split", "validation split").
    """

    def __init__(self, docs: list[np.ndarray], config: ModelConfig, seq_len: int, *, bos: int, eos: int,
                 min_piece_tokens: int = 8, max_piece_tokens: int = 990, lm_share: float = 0.5,
                 mask_ratio: tuple[float, float] = (0.15, 0.5), seed: int = 0, split: str = "corpus"):
        if seq_len > config.position_bias_max_distance:
            raise CpmantError(
                f"seq_len {seq_len} is longer than the model's position range "
                f"(position_bias_max_distance={config.position_bias_max_distance})",
                "lower seq_len, or use a preset with a larger position_bias_max_distance",
            )
        if config.prompt_types < 3:
            raise CpmantError(f"prompt_types={config.prompt_types} leaves no room for tasks 1 and 2",
                              "use a model config with prompt_types >= 3")
        P = config.prompt_length
        if (TASK_LM + 1) * P > config.vocab_size:  # later pieces' prompt ids are read through the token table
            raise CpmantError(f"vocab_size {config.vocab_size} is under {(TASK_LM + 1) * P}, the prompt ids of "
                              f"task {TASK_LM} with prompt_length {P}", "use a larger vocab_size")
        self.config = config
        self.seq_len = seq_len
        self.piece_room = seq_len - P  # the longest piece: a row holds one prompt and one piece at least
        if self.piece_room < min_piece_tokens:
            raise CpmantError(f"seq_len {seq_len} leaves {self.piece_room} text positions after the prompt",
                              f"raise seq_len above prompt_length + {min_piece_tokens}")
        pieces = make_pieces(docs, bos, eos, min_piece_tokens, min(max_piece_tokens, self.piece_room))
        if not pieces:
            tokens = sum(len(d) for d in docs)
            cause = ("it is empty" if not docs else
                     f"its {len(docs)} document(s) ({tokens} tokens in all) are each shorter than "
                     f"min_piece_tokens={min_piece_tokens} tokens with <s> and </s>")
            raise CpmantError(f"the {split} gives no piece to train or validate on: {cause}",
                              "add text to the corpus (more or longer documents), or lower min_piece_tokens")
        self.rows = pack(pieces, seq_len, overhead=P)
        self.lm_share = lm_share
        self.mask_ratio = mask_ratio
        self.seed = seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens_per_epoch(self) -> int:
        """Text tokens (prompts not counted) in one pass over the rows."""
        return sum(len(p) for r in self.rows for p in r)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return self._perm_cache[epoch]

    def row(self, index: int, shuffle: bool = True, task: int | None = None) -> dict[str, np.ndarray]:
        """Row `index` of the stream as numpy arrays (one row, length seq_len); `task` forces every piece's task."""
        n = len(self.rows)
        epoch, k = divmod(index, n)
        row_id = int(self._perm(epoch)[k]) if shuffle else k
        rng = np.random.default_rng([self.seed, epoch, row_id, 7])
        P, T = self.config.prompt_length, self.seq_len
        inp = np.zeros(T, np.int64)
        context = np.ones(T, bool)
        position = np.zeros(T, np.int64)
        segment = np.zeros(T, np.int64)
        span = np.zeros(T, np.int64)
        target = np.full(T, IGNORE, np.int64)
        tasks = np.zeros(T, np.int64)
        pos = 0
        for s, piece in enumerate(self.rows[row_id]):
            t = task if task is not None else (TASK_LM if rng.random() < self.lm_share else TASK_MASK)
            L = len(piece)
            # the piece's prompt: context, segment 0, positions 0..P-1, its span
            pr = slice(pos, pos + P)
            inp[pr] = t * P + np.arange(P)
            position[pr] = np.arange(P)
            span[pr] = s
            tasks[pr] = t
            # the piece's text
            sl = slice(pos + P, pos + P + L)
            inp[sl] = piece
            position[sl] = P + np.arange(L)
            segment[sl] = t
            span[sl] = s
            tasks[sl] = t
            if t == TASK_LM:
                cut = int(rng.integers(1, L))  # positions >= cut are predicted; <s> always stays context
                nc = np.arange(L) >= cut
            else:
                ratio = rng.uniform(*self.mask_ratio)
                nc = rng.random(L) < ratio
                nc[0] = False
                if not nc.any():
                    nc[int(rng.integers(1, L))] = True
            context[sl] = ~nc
            # target at i is token i+1 when i+1 is non-context (both inside this piece's text)
            tgt = np.full(L, IGNORE, np.int64)
            tgt[:-1] = np.where(nc[1:], piece[1:], IGNORE)
            target[sl] = tgt
            pos += P + L
        return dict(input=inp, length=np.int64(pos), context=context, position=position, segment=segment,
                    span=span, target=target, task=tasks)

    def batch(self, indices, shuffle: bool = True, task: int | None = None) -> Batch:
        rows = [self.row(i, shuffle=shuffle, task=task) for i in indices]
        st = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        return Batch(**st)
