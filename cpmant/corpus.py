"""Text corpora: fetch the default one (Debian's fortunes-zh), read any folder of text, clean, dedup, split.

What counts as a corpus file (searched recursively, sorted by relative path, hidden files skipped):

- `*.txt`: UTF-8 text; documents are separated by blank lines or by lines that are exactly `%`.
- `*.jsonl`: one JSON object per line, the text under "text" (or "content"); blank lines are skipped.
- fortune files: files with no extension that contain a line that is exactly `%` (the fortune(6) format, as
  Debian ships it in /usr/share/games/fortunes); documents are separated by `%` lines only, so a poem keeps its
  blank lines. Extension-less files without a `%` line (README, copyright, LICENSE) are ignored, as is everything
  else; `stats["ignored_files"]` counts them.

Cleaning (no NFKC: it would turn full-width Chinese punctuation and digits into ASCII): ANSI colour codes are
removed, line ends become "\\n", tabs and other horizontal spaces (NBSP, en/em spaces) become " " (the ideographic
space U+3000 stays), control characters are dropped, trailing spaces are stripped, runs of 3+ newlines become two,
and leading/trailing blank lines go.

Dedup, as CPM-Ant did it, by paragraph hash over the whole corpus in order: a paragraph is a block between blank
lines, normalised by removing all whitespace. A document whose normalised text was already seen is dropped; a
paragraph of at least DEDUP_MIN_CHARS characters whose hash was already seen is removed from its document (short
headings like "其一" or "提示" are left alone); documents left empty are dropped.

Split: each document goes to valid when a seeded hash of its text falls under valid_fraction, so adding documents
never moves the others; valid is never empty when there are at least two documents. A corpus of a single document
(one long line, one paragraph) is split by chunks instead: the document is cut at line ends into chunks of about
SPLIT_CHUNK_CHARS characters (a longer line is cut inside), and the chunks are split as documents
(`stats["split_by"]` says which; the chunking is part of the hash).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CpmantError
from .hashing import Sha256, sha256_file
from .fsutil import atomic_write_text
from .paths import cpmant_home

FORTUNES_PACKAGE = "fortunes-zh"
FORTUNE_FILES = ("chinese", "song100", "tang300")
MARKER = ".complete"  # written last by fetch_fortunes_zh: its presence means the folder is whole
DEDUP_MIN_CHARS = 8  # paragraphs shorter than this (whitespace removed) are never treated as duplicates
SPLIT_VERSION = 1  # bump when cleaning, dedup or split rules change: it is part of Corpus.sha256
SPLIT_CHUNK_CHARS = 128  # chunk size when a one-document corpus is split by chunks

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]?")  # also eats broken sequences like "\x1b[;" in fortunes-zh
_HSPACE = re.compile(r"[\t\v\f\xa0\u1680\u2000-\u200a\u202f\u205f]")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\ufeff]")  # after tabs became spaces: all but "\n"
_TRAILING = re.compile(r"[ ]+$", re.M)
_MANY_NEWLINES = re.compile(r"\n{3,}")
_PERCENT_LINE = re.compile(r"^%[ \t]*$", re.M)
_BLANK_LINES = re.compile(r"\n(?:[ \t\u3000]*\n)+")  # one or more blank lines
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Corpus:
    """A cleaned, deduplicated corpus split into train and valid documents."""

    name: str  # the folder's name ("fortunes-zh" for the default)
    train: tuple[str, ...]  # training documents, in corpus order
    valid: tuple[str, ...]  # validation documents, in corpus order
    sha256: str  # hash of the cleaned, deduplicated documents in order plus the split parameters
    stats: dict = field(default_factory=dict, compare=False)  # counts: files, documents, chars, duplicates...


def clean_text(text: str) -> str:
    """Strip ANSI colour codes, normalise line ends and spaces, drop control characters (no NFKC)."""
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _HSPACE.sub(" ", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip("\n")


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CpmantError(
            f"corpus file {path} is not UTF-8: byte {e.start} (0x{data[e.start]:02x}) cannot be decoded",
            f"convert it, e.g. `iconv -f GB18030 -t UTF-8 {path} > {path}.utf8 && mv {path}.utf8 {path}`, "
            "or remove it from the corpus folder",
        ) from None
    return text.removeprefix("\ufeff")


def _is_fortune(path: Path, data: bytes) -> bool:
    return path.suffix == "" and (data.startswith(b"%\n") or b"\n%\n" in data or b"\n%\r\n" in data)


def _read_jsonl(path: Path, text: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): "\u2028" may sit inside a string
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        fix = 'make each line one JSON object with the text under "text", e.g. {"text": "床前明月光"}'
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CpmantError(f"bad JSONL line {where}: {e.msg} at column {e.colno}", fix) from None
        if not isinstance(obj, dict):
            raise CpmantError(f"bad JSONL line {where}: a {type(obj).__name__}, not a JSON object", fix)
        value = obj.get("text", obj.get("content"))
        if not isinstance(value, str):
            problem = 'no "text" or "content" key' if value is None else f'"text" is a {type(value).__name__}'
            raise CpmantError(f"bad JSONL line {where}: {problem}", fix)
        docs.append(value)
    return docs


def read_documents(path: Path) -> tuple[list[str], dict]:
    """The raw documents of a corpus folder (or one file), in sorted file order, and file counts."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CpmantError(
            f"corpus folder {path} does not exist",
            "pass `--corpus DIR` with a folder of .txt or .jsonl files, or leave it out to use fortunes-zh",
        )
    if path.is_file():
        root, files = path.parent, [path]
    else:
        root = path
        files = sorted(
            (p for p in path.rglob("*") if p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    docs: list[str] = []
    used, ignored = [], 0
    for f in files:
        suffix = f.suffix.lower()
        if suffix not in (".txt", ".jsonl", ""):
            ignored += 1
            continue
        data = f.read_bytes()
        if suffix == "":
            if not _is_fortune(f, data):
                ignored += 1
                continue
            parts = _PERCENT_LINE.split(_decode(f, data).replace("\r\n", "\n"))
        elif suffix == ".txt":
            lines = _decode(f, data).replace("\r\n", "\n").replace("\r", "\n").split("\n")
            parts = _BLANK_LINES.split("\n".join("" if _PERCENT_LINE.fullmatch(ln) else ln for ln in lines))
        else:
            parts = _read_jsonl(f, _decode(f, data))
        used.append(f.relative_to(root).as_posix())
        docs.extend(parts)
    if not used:
        raise CpmantError(
            f"no corpus files in {path} (found {len(files)} files, none .txt, .jsonl or fortune format)",
            "put UTF-8 .txt files (documents separated by blank lines) or .jsonl files "
            '({"text": ...} per line) in the folder, or pass another `--corpus DIR`',
        )
    return docs, {"files": len(used), "file_names": used, "ignored_files": ignored}


def _norm(paragraph: str) -> str:
    return _WHITESPACE.sub("", paragraph)


def dedup_documents(docs: list[str]) -> tuple[list[str], dict]:
    """Clean every document and drop repeated documents and repeated paragraphs (see the module doc)."""
    seen_docs: set[bytes] = set()
    seen_paragraphs: set[bytes] = set()
    out: list[str] = []
    counts = {"raw_documents": len(docs), "empty_documents": 0, "duplicate_documents": 0,
              "duplicates_dropped": 0, "documents_emptied": 0}
    for raw in docs:
        doc = clean_text(raw)
        if not _norm(doc):
            counts["empty_documents"] += 1
            continue
        # de-duplication fingerprints (not identities: they only decide which copies are dropped)
        key = hashlib.blake2b(_norm(doc).encode(), digest_size=16).digest()
        if key in seen_docs:
            counts["duplicate_documents"] += 1
            continue
        seen_docs.add(key)
        kept = []
        for para in _BLANK_LINES.split(doc):
            norm = _norm(para)
            if not norm:
                continue
            if len(norm) >= DEDUP_MIN_CHARS:
                h = hashlib.blake2b(norm.encode(), digest_size=16).digest()
                if h in seen_paragraphs:
                    counts["duplicates_dropped"] += 1
                    continue
                seen_paragraphs.add(h)
            kept.append(para.strip("\n"))
        if not kept:
            counts["documents_emptied"] += 1
            continue
        out.append(doc if len(kept) == len(_BLANK_LINES.split(doc)) else "\n\n".join(kept))
    return out, counts


def _split_key(doc: str, seed: int) -> float:
    # the keyed split: decides membership (train / valid), never reuse, so it is not an identity hash
    h = hashlib.blake2b(doc.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "big") / 2**64


def split_documents(docs: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hash split: stable under adding documents; valid is non-empty (and train too) with 2+ documents."""
    keys = [_split_key(d, seed) for d in docs]
    is_valid = [k < valid_fraction for k in keys]
    if len(docs) >= 2 and not any(is_valid):
        is_valid[min(range(len(docs)), key=keys.__getitem__)] = True
    if len(docs) >= 2 and all(is_valid):
        is_valid[max(range(len(docs)), key=keys.__getitem__)] = False
    train = [d for d, v in zip(docs, is_valid) if not v]
    valid = [d for d, v in zip(docs, is_valid) if v]
    return train, valid


def split_into_chunks(doc: str, size: int = SPLIT_CHUNK_CHARS) -> list[str]:
    """Cut one document into chunks of at most `size` characters at line ends (a longer line is cut inside it);
    at least two chunks whenever the document has two characters, so that both sides of a split get text."""
    chunks: list[str] = []
    cur = ""
    for line in doc.split("\n"):
        while len(line) > size:
            if cur:
                chunks.append(cur)
                cur = ""
            chunks.append(line[:size])
            line = line[size:]
        if cur and len(cur) + 1 + len(line) > size:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line
    if cur:
        chunks.append(cur)
    chunks = [c for c in chunks if c.strip()]
    if len(chunks) == 1 and len(doc) >= 2:
        half = len(doc) // 2
        chunks = [c for c in (doc[:half], doc[half:]) if c.strip()]
    return chunks


def corpus_sha256(docs: list[str], valid_fraction: float, seed: int, split_by: str = "documents") -> str:
    """The corpus's identity: its split settings then every document (length, bytes), streamed.

    The settings keep the JSON form they were first hashed in (json.dumps with sorted keys), not
    cpmant.hashing.canonical_json: this is the contract tag `cpmant.data_sha256` on every registered version and in
    every checkpoint's lineage, so a new form would make each model of an existing home look trained on another
    corpus (cpmant.lineage refuses it)."""
    h = Sha256()
    params = {"valid_fraction": valid_fraction, "seed": seed, "dedup_min_chars": DEDUP_MIN_CHARS,
              "version": SPLIT_VERSION}
    if split_by != "documents":  # absent for the usual split: its hashes stay what they were
        params["split_by"] = f"{split_by}-{SPLIT_CHUNK_CHARS}"
    h.update(json.dumps(params, sort_keys=True).encode())
    for d in docs:
        b = d.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def load_corpus(path: Path | None = None, valid_fraction: float = 0.05, seed: int = 0) -> Corpus:
    """Read, clean, dedup and split a corpus folder; None means the default, fortunes-zh (fetched once)."""
    if not 0.0 < valid_fraction < 1.0:
        raise CpmantError(
            f"valid_fraction must be between 0 and 1 (exclusive), got {valid_fraction}",
            "use a small fraction such as 0.05",
        )
    if path is None:
        path = fetch_fortunes_zh()
    path = Path(path).expanduser()
    raw, file_stats = read_documents(path)
    docs, counts = dedup_documents(raw)
    if not docs:
        raise CpmantError(
            f"corpus {path} is empty: {file_stats['files']} files but no text after cleaning",
            "put some UTF-8 text in the .txt/.jsonl files, or pass another `--corpus DIR`",
        )
    split_by = "documents"
    if len(docs) < 2:  # one document cannot be split: split its chunks instead
        split_by = "chunks"
        train, valid = split_documents(split_into_chunks(docs[0]), valid_fraction, seed)
    else:
        train, valid = split_documents(docs, valid_fraction, seed)
    stats = {
        **file_stats,
        "documents": len(docs),
        "chars": sum(len(d) for d in docs),
        **counts,
        "train_documents": len(train),
        "valid_documents": len(valid),
        "train_chars": sum(len(d) for d in train),
        "valid_chars": sum(len(d) for d in valid),
        "split_by": split_by,
    }
    name = path.stem if path.is_file() else path.resolve().name
    return Corpus(name, tuple(train), tuple(valid), corpus_sha256(docs, valid_fraction, seed, split_by), stats)


def _run(cmd: list[str], cwd: Path, what: str, fix: str) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise CpmantError(f"{what} timed out after 300 s (`{' '.join(cmd)}`)", fix) from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()][-4:]
        raise CpmantError(f"{what} failed (`{' '.join(cmd)}`, exit {res.returncode}): "
                          f"{' | '.join(lines) or 'no output'}", fix)
    return res


def fetch_fortunes_zh(dest: Path | None = None) -> Path:
    """The default corpus: Debian's fortunes-zh (GPL-3), fetched with apt-get download and dpkg -x, once.

    Keeps the fortune text files chinese, song100 and tang300 and the package's copyright file under dest
    (default CPMANT_HOME/corpora/fortunes-zh); a marker written last makes later calls a no-op.
    """
    dest = Path(dest).expanduser() if dest is not None else cpmant_home() / "corpora" / FORTUNES_PACKAGE
    if (dest / MARKER).is_file():
        return dest
    own = "or pass `--corpus DIR` with your own .txt/.jsonl files"
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise CpmantError(
                f"`{tool}` is not on PATH, so the default corpus ({FORTUNES_PACKAGE}) cannot be fetched",
                f"run on a Debian/Ubuntu machine, {own}",
            )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest) as tmp:
        tmp = Path(tmp)
        try:
            _run(["apt-get", "download", FORTUNES_PACKAGE], tmp, f"downloading {FORTUNES_PACKAGE}",
                 f"check the network and the apt sources, {own}")
        except CpmantError as e:
            if "locate package" in e.problem or "No packages found" in e.problem:
                raise CpmantError(
                    f"apt does not know the package {FORTUNES_PACKAGE} (the package lists are missing or stale)",
                    f"run `apt-get update` (as root) first, {own}",
                ) from None
            raise
        debs = sorted(tmp.glob(f"{FORTUNES_PACKAGE}_*.deb"))
        if not debs:
            raise CpmantError(f"apt-get download left no {FORTUNES_PACKAGE}_*.deb in {tmp}",
                              f"check the apt configuration, {own}")
        _run(["dpkg", "-x", str(debs[-1]), "x"], tmp, f"unpacking {debs[-1].name}",
             f"check that dpkg works and the disk has room, {own}")
        root = tmp / "x" / "usr" / "share"
        sources = {name: root / "games" / "fortunes" / name for name in FORTUNE_FILES}
        sources["copyright"] = root / "doc" / FORTUNES_PACKAGE / "copyright"
        for name, src in sources.items():
            if not src.is_file():
                raise CpmantError(f"{debs[-1].name} has no {src.relative_to(tmp / 'x')}",
                                  f"the package layout changed; {own}")
            shutil.copyfile(src, tmp / name)
            (tmp / name).replace(dest / name)
        marker = {"package": FORTUNES_PACKAGE, "deb": debs[-1].name,
                  "deb_sha256": sha256_file(debs[-1]),
                  "files": sorted(sources), "license": "GPL-3.0+"}
        atomic_write_text(dest / MARKER, json.dumps(marker, indent=1) + "\n")  # last: the folder is whole
    return dest
