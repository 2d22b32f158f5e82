"""Tokenize many documents on all cores, cached on disk by content hash.

The cache file is `<cache_dir>/<key>.npz` with two arrays, `ids` (int32, all documents concatenated) and
`offsets` (int64, n+1 boundaries); it loads without pickle. The key hashes the documents, the vocab's sha256,
TOKENIZER_VERSION, jieba's version and drop_unk, so any change re-encodes.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import CpmantError
from .fsutil import atomic_write_bytes
from .hashing import Sha256
from .paths import subdir
from .tokenizer import TOKENIZER_VERSION, CPMAntTokenizer, jieba  # jieba: imported there, quietly

CACHE_VERSION = 1

_worker_tokenizer: CPMAntTokenizer | None = None
_worker_drop_unk = True


def _encode_one(tok: CPMAntTokenizer, doc: str, drop_unk: bool) -> np.ndarray:
    ids = np.asarray(tok.encode(doc), dtype=np.int32)
    return ids[ids != tok.unk_id] if drop_unk else ids


def _init_worker(vocab_path: str, drop_unk: bool) -> None:
    global _worker_tokenizer, _worker_drop_unk
    # a forked worker inherits its parent's SIGTERM handler (Prefect's, in a flow run, raises and prints a
    # traceback); the pool ends its workers with SIGTERM, which must simply end them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_tokenizer = CPMAntTokenizer(vocab_path)
    _worker_drop_unk = drop_unk


def _encode_chunk(chunk: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One worker's share: the concatenated ids and each document's length (cheaper to send than a list)."""
    arrays = [_encode_one(_worker_tokenizer, d, _worker_drop_unk) for d in chunk]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.int32)), lengths


def cache_key(docs: Sequence[str], vocab_sha256: str, drop_unk: bool) -> str:
    h = Sha256()
    h.update(f"cpmant-encode v{CACHE_VERSION} tok v{TOKENIZER_VERSION} jieba {jieba.__version__} "
             f"vocab {vocab_sha256} drop_unk {bool(drop_unk)} n {len(docs)}\n".encode())
    for d in docs:
        b = d.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _split(ids: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [ids[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1)]


def _save(path: Path, ids: np.ndarray, offsets: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, ids=ids, offsets=offsets)
    atomic_write_bytes(path, buf.getvalue())


def encode_documents(
    docs: Sequence[str],
    tokenizer_or_vocab_path: CPMAntTokenizer | str | os.PathLike,
    cache_dir: Path | None = None,
    num_workers: int | None = None,
    drop_unk: bool = True,
    progress: bool = True,
) -> list[np.ndarray]:
    """Token ids (int32) of each document, no <s>/</s> added; <unk> ids dropped unless drop_unk=False.

    cache_dir: where encodings are cached (default CPMANT_HOME/cache/encoded); a call with the same documents,
    vocab and options loads the cached file instead of encoding. num_workers: processes (default all cores; 1
    encodes in this process). Workers fork (spawn where fork does not exist).
    """
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise CpmantError("encode_documents needs a sequence of str documents",
                          "pass e.g. `list(corpus.train)`, not a single string or other objects")
    if isinstance(tokenizer_or_vocab_path, CPMAntTokenizer):
        tok: CPMAntTokenizer | None = tokenizer_or_vocab_path
        vocab_path, vocab_sha = tok.vocab_path, tok.vocab_sha256
    else:
        tok = CPMAntTokenizer(tokenizer_or_vocab_path)  # validates the vocab; cheap next to encoding
        vocab_path, vocab_sha = tok.vocab_path, tok.vocab_sha256
    workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    if workers < 1:
        raise CpmantError(f"num_workers must be >= 1, got {num_workers}", "pass 1 or more, or None for all cores")

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else subdir("cache", "encoded")
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{cache_key(docs, vocab_sha, drop_unk)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return _split(z["ids"], z["offsets"])

    n = len(docs)
    workers = min(workers, n) if n else 1
    with tqdm(total=n, unit="doc", desc="encode", disable=not progress) as bar:
        if workers == 1:
            arrays = []
            for d in docs:
                arrays.append(_encode_one(tok, d, drop_unk))
                bar.update(1)
            lengths = np.array([len(a) for a in arrays], dtype=np.int64)
            ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        else:
            size = max(1, math.ceil(n / (workers * 16)))  # ~16 chunks per worker: balance and a live bar
            chunks = [list(docs[i: i + size]) for i in range(0, n, size)]
            # fork: workers start in milliseconds and scripts need no `if __name__ == "__main__"` guard;
            # they run only pure Python and numpy, so threads of the parent (tqdm, torch) do them no harm.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            parts, lens = [], []
            with mp.get_context(method).Pool(workers, _init_worker, (str(vocab_path), drop_unk)) as pool:
                for chunk, (chunk_ids, chunk_lens) in zip(chunks, pool.imap(_encode_chunk, chunks)):
                    parts.append(chunk_ids)
                    lens.append(chunk_lens)
                    bar.update(len(chunk))
            ids = np.concatenate(parts).astype(np.int32, copy=False)
            lengths = np.concatenate(lens)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    _save(path, ids, offsets)
    return _split(ids, offsets)
