"""Pull a registered version: resolve `models:/NAME/VERSION` or `models:/NAME@ALIAS`, download its checkpoint,
verify every file's sha256 against the version's tags, and hand back a model that generates.

    from registry import pull
    model = pull("models:/cpm-ant-tiny@champion")
    model.generate("床前明月光")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cpmant.checkpoint import WEIGHTS_FILE, is_complete, sha256_file
from cpmant.errors import CpmantError
from cpmant.paths import subdir

from .tracking import setup_tracking

FILE_TAG_PREFIX = "cpmant.file_sha256."


def _parse(uri: str) -> tuple[str, str]:
    body = uri[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, "@" + alias
    if "/" in body:
        name, ver = body.rsplit("/", 1)
        return name, ver
    raise CpmantError(f"cannot parse model URI {uri!r}", "write models:/NAME/VERSION or models:/NAME@ALIAS")


def resolve_version(uri: str) -> tuple[str, int]:
    """(name, version number) of a models:/ URI; a clear error when it is not in the registry."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        raise CpmantError(f"{uri!r} is not a registry URI", "write models:/NAME/VERSION or models:/NAME@ALIAS")
    name, ref = _parse(uri)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@") else client.get_model_version(
            name, ref)
    except MlflowException as e:
        raise CpmantError(f"{uri} is not in the registry ({e.message.splitlines()[0]})",
                          "list versions in the MLflow UI, or run `cpmant pretrain` to make one") from None
    return name, int(mv.version)


def expected_hashes(name: str, version: int) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_model_version(name, str(version)).tags
    files = {k[len(FILE_TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(FILE_TAG_PREFIX)}
    if not files and tags.get("cpmant.checkpoint_sha256"):
        files = {WEIGHTS_FILE: tags["cpmant.checkpoint_sha256"]}
    if not files:
        raise CpmantError(f"models:/{name}/{version} carries no sha256 tags to verify against",
                          "re-register it with `cpmant register DIR --name NAME`, which records them")
    return files


VERIFIED_FILE = ".cpmant-verified.json"


def _stat_key(f: Path) -> list[int]:
    st = f.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def verify_files(folder: Path, expected: dict[str, str], uri: str, remember: bool = False) -> None:
    """Every registered file is present and hashes to its tag; otherwise refuse with the file named.

    With `remember`, a successful check records each file's size, mtime and inode beside them, and a later check
    of the same cached folder rehashes only files whose record changed.
    """
    record_path = folder.parent / f"{folder.name}{VERIFIED_FILE}"
    record: dict = {}
    if remember and record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except ValueError:
            record = {}
    fresh: dict = {}
    for fname, want in sorted(expected.items()):
        f = folder / fname
        if not f.is_file():
            raise CpmantError(f"{uri}: file {fname} is missing from the download",
                              "pull again; if it persists the stored artifact is damaged: re-register the checkpoint")
        key = _stat_key(f)
        if record.get(fname) == [want, *key]:
            fresh[fname] = record[fname]
            continue
        got = sha256_file(f)
        if got != want:
            raise CpmantError(
                f"{uri}: {fname} does not match its registered sha256 (expected {want[:16]}…, got {got[:16]}…): "
                "the stored file was changed or truncated",
                "do not use this copy; re-register the original checkpoint (`cpmant register DIR --name NAME`) "
                "or pull another version",
            )
        fresh[fname] = [want, *key]
    if remember:
        record_path.write_text(json.dumps(fresh), encoding="utf-8")


def _download_model(name: str, version: int, dest: Path) -> Path:
    """Download the logged model into dest (atomically) and return the checkpoint folder inside it."""
    import mlflow

    if not (dest / "MLmodel").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
            try:
                os.rename(tmp, dest)  # atomic; fails if another process got there first
            except OSError:
                if not (dest / "MLmodel").exists():  # a leftover without MLmodel is not a download: replace it
                    shutil.rmtree(dest, ignore_errors=True)
                    os.rename(tmp, dest)
                # else: a concurrent download won; use its copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    mlmodel = yaml.safe_load((dest / "MLmodel").read_text(encoding="utf-8"))
    rel = mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    return dest / rel


def checkpoint_dir(uri: str, verify: bool = True) -> Path:
    """A local, verified checkpoint folder for `uri` (registry versions are cached under CPMANT_HOME/cache/models);
    a local checkpoint folder is returned as is."""
    if not uri.startswith("models:/"):
        p = Path(uri).expanduser()
        if is_complete(p):
            return p
        raise CpmantError(f"{uri} is neither a models:/ URI nor a complete checkpoint folder",
                          "pass models:/NAME/VERSION, models:/NAME@ALIAS, or a folder with cpmant_meta.json")
    setup_tracking()
    name, version = resolve_version(uri)
    from mlflow.tracking import MlflowClient

    from .tracking import tracking_uri

    # keyed by store and version source: models:/x/1 of another store (or a re-created model) is another download
    src = MlflowClient().get_model_version(name, str(version)).source
    key = hashlib.sha256(f"{tracking_uri()}|{src}".encode()).hexdigest()[:12]
    dest = subdir("cache", "models", name) / f"{version}-{key}"
    ckpt = _download_model(name, version, dest)
    if verify:
        try:
            verify_files(ckpt, expected_hashes(name, version), uri, remember=True)
        except CpmantError:
            shutil.rmtree(dest, ignore_errors=True)  # never keep a bad copy in the cache
            raise
    return ckpt


def download(uri: str, to: str | Path) -> Path:
    """`cpmant pull URI --to DIR`: the version's checkpoint files in DIR, each verified against its sha256 tag."""
    to = Path(to).expanduser().resolve()
    if to.exists() and any(to.iterdir()):
        raise CpmantError(f"{to} is not empty", "pass --to a new or empty folder")
    setup_tracking()
    name, version = resolve_version(uri)
    with tempfile.TemporaryDirectory(prefix=".cpmant-pull-", dir=to.parent if to.parent.exists() else None) as tmp:
        ckpt = _download_model(name, version, Path(tmp) / "model")
        verify_files(ckpt, expected_hashes(name, version), uri)
        to.mkdir(parents=True, exist_ok=True)
        for f in ckpt.iterdir():
            shutil.move(str(f), to / f.name)
    return to


@dataclass
class PulledModel:
    uri: str
    path: Path
    model: object = field(repr=False)
    tokenizer: object = field(repr=False)

    def generate(self, text: str | list[str], **kwargs) -> str | list[str]:
        """Continue one text (returns a str) or several (a list); kwargs as cpmant.generate.generate."""
        from cpmant.generate import generate

        texts = [text] if isinstance(text, str) else list(text)
        out = generate(self.model, self.tokenizer, texts, **kwargs)
        return out[0] if isinstance(text, str) else out


def pull(uri: str, device: str = "cpu") -> PulledModel:
    """Resolve, download (cached), verify and load a version: `pull("models:/cpm-ant-tiny@champion").generate(...)`."""
    from cpmant.checkpoint import load_pretrained

    path = checkpoint_dir(uri)
    model, tok = load_pretrained(path, device=device)
    return PulledModel(uri, path, model, tok)
