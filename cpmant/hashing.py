"""The project's one hashing helper: every identity hash (a reuse key, a config, data or checkpoint hash, a
held-out set's identity) is a sha256 made here, over one canonical JSON form.

    canonical_json(obj) -> str     sorted keys, no spaces, UTF-8 kept (ensure_ascii=False); Path as str, tuple and
                                   set as lists (a set sorted), dataclasses and pydantic models as their fields;
                                   anything else is a TypeError (a key never silently depends on a repr)
    sha256_json(obj) -> str        sha256 of canonical_json(obj)
    sha256_text(text) / sha256_bytes(data)
    sha256_file(path) -> str       streamed in 1 MiB blocks
    Sha256                         hashlib's incremental sha256, for callers that feed a stream (corpus, tokens)

Hashes that are not identities (the corpus split's keyed blake2b, de-duplication fingerprints, seeds derived from
integers) stay where they are used: they decide membership or randomness, never whether a result is reused.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from pathlib import Path, PurePath
from typing import Any

Sha256 = hashlib.sha256
BLOCK = 1 << 20


def _plain(obj: Any) -> Any:
    """`obj` as JSON-able data; the `default` of json.dumps."""
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=canonical_json)
    if isinstance(obj, tuple):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    dump = getattr(obj, "model_dump", None)  # a pydantic model, without importing pydantic here
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"{type(obj).__name__} has no canonical JSON form: hash its content (a dict of plain values)")


def canonical_json(obj: Any) -> str:
    """The one JSON form every identity hash is taken over."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_plain)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_json(obj: Any) -> str:
    """sha256 of `obj`'s canonical JSON form."""
    return sha256_text(canonical_json(obj))


def sha256_file(path: str | Path, block: int = BLOCK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()

