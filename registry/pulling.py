"""Pull a registered version: resolve `models:/NAME/VERSION` or `models:/NAME@ALIAS`, download its checkpoint,
verify every file's sha256 against the version's tags, and hand back a model that generates.

    from registry import pull
    model = pull("models:/cpm-ant-tiny@champion")
    model.generate("床前明月光")

A delta version (its checkpoint folder holds `delta.safetensors`, see cpmant/delta/checkpoint.py) is composed on
load: its base, named in its delta_config.json by URI and sha256, is pulled through the same cache (downloaded and
verified once, shared by every delta of that base), checked against the sha256 the delta names, and the delta is
applied to it. `load_model(uri_or_dir)` does this for any version or folder; `pull(uri, merge=True)` and
`download(uri, to, merge=True)` give a plain checkpoint with LoRA folded into the weights.

(This module is `registry.pulling`, so that `registry.pull` is only ever the function.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cpmant.checkpoint import DELTA_WEIGHTS_FILE, WEIGHTS_FILE, is_complete, sha256_file
from cpmant.errors import CpmantError
from cpmant.fsutil import write_json_atomic
from cpmant.hashing import sha256_json
from cpmant.paths import subdir

from .tags import CHECKPOINT_SHA256, FILE_SHA256_PREFIX
from .tracking import setup_tracking

URI_FIX = "write models:/NAME/VERSION or models:/NAME@ALIAS"


def _parse(uri: str) -> tuple[str, str]:
    """(name, "VERSION" or "@ALIAS") of a models:/ URI."""
    body = uri[len("models:/"):]
    if "@" in body:
        name, ref = body.split("@", 1)
        ref = "@" + ref if ref else ""
    elif "/" in body:
        name, ref = body.rsplit("/", 1)
    else:
        name, ref = body, ""
    if not name or not ref or "/" in name:
        raise CpmantError(f"cannot parse model URI {uri!r}", URI_FIX)
    return name, ref


def resolve_version(uri: str) -> tuple[str, int]:
    """(name, version number) of a models:/ URI; a clear error when it is not in the registry."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not isinstance(uri, str) or not uri.startswith("models:/"):
        raise CpmantError(f"{uri!r} is not a registry URI", URI_FIX)
    name, ref = _parse(uri)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@") else client.get_model_version(
            name, ref)
    except MlflowException as e:
        raise CpmantError(f"{uri} is not in the registry ({e.message.splitlines()[0]})",
                          "list versions in the MLflow UI, or run `cpmant pretrain` to make one") from None
    return name, int(mv.version)


def _hashes_of(tags: dict, name: str, version: int) -> dict[str, str]:
    files = {k[len(FILE_SHA256_PREFIX):]: v for k, v in tags.items() if k.startswith(FILE_SHA256_PREFIX)}
    if not files and tags.get(CHECKPOINT_SHA256):
        files = {WEIGHTS_FILE: tags[CHECKPOINT_SHA256]}
    if not files:
        raise CpmantError(f"models:/{name}/{version} carries no sha256 tags to verify against",
                          "re-register it with `cpmant register DIR --name NAME`, which records them")
    return files


def expected_hashes(name: str, version: int) -> dict[str, str]:
    """{file name: sha256} of a version's checkpoint files, from its tags."""
    from mlflow.tracking import MlflowClient

    return _hashes_of(MlflowClient().get_model_version(name, str(version)).tags, name, version)


VERIFIED_FILE = ".cpmant-verified.json"
CACHE_KEY_FILE = "cpmant-cache-key.json"


def require_full_weights(uri: str, verb: str) -> tuple[str, int]:
    """(name, version) of `uri` when it holds a model's full weights; a CpmantError for a delta, which holds only
    its own (LoRA's) tensors: `verb` (e.g. compress) needs them merged into its base first. Reads tags only."""
    setup_tracking()
    name, version = resolve_version(uri)
    files = expected_hashes(name, version)
    if WEIGHTS_FILE not in files and DELTA_WEIGHTS_FILE in files:
        raise CpmantError(f"{uri} is a delta (only its {DELTA_WEIGHTS_FILE}, no {WEIGHTS_FILE}): it cannot be "
                          f"{verb}ed on its own",
                          f"merge it into its base first: `cpmant pull {uri} --to DIR --merge`, then "
                          f"`cpmant register DIR --name NAME` and {verb} the merged version")
    return name, version


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
        write_json_atomic(record_path, fresh)


def check_local_checkpoint(path: str | Path) -> Path:
    """A local checkpoint folder that loads: complete (metadata present) and every file intact. Uses
    `cpmant.checkpoint.verify_checkpoint` where the core has it, else loads the model (a truncated or corrupt
    safetensors file fails there). Any failure is one CpmantError naming the folder."""
    import cpmant.checkpoint as ck

    p = Path(path).expanduser()
    if not p.exists():
        raise CpmantError(f"{p} does not exist", "pass the path of a checkpoint folder (it holds cpmant_meta.json)")
    if not p.is_dir():
        raise CpmantError(f"{p} is not a folder", "pass the checkpoint's folder, not one of its files")
    ck.read_meta(p)  # a CpmantError when the metadata written last is missing
    from cpmant.delta.checkpoint import is_delta_checkpoint, verify_delta

    verify = verify_delta if is_delta_checkpoint(p) else getattr(ck, "verify_checkpoint", None)
    try:
        if verify is not None:
            verify(p)
        else:
            ck.load_pretrained(p)
    except CpmantError:
        raise
    except Exception as e:  # SafetensorError, OSError, shape mismatches...: the folder is damaged
        first = (str(e).splitlines() or [""])[0][:300]
        raise CpmantError(f"{p} is not an intact checkpoint ({type(e).__name__}: {first})",
                          "point at an intact checkpoint folder (an interrupted copy or save truncates files); "
                          "re-save or re-copy it") from None
    return p


def _download_model(name: str, version: int, dest: Path) -> Path:
    """Download the logged model into dest (atomically) and return the checkpoint folder inside it."""
    import mlflow

    if not (dest / "MLmodel").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
            _require_downloaded(tmp, name, version)
            try:
                os.rename(tmp, dest)  # atomic; fails if another process got there first
            except OSError:
                if not (dest / "MLmodel").exists():  # a leftover without MLmodel is not a download: replace it
                    shutil.rmtree(dest, ignore_errors=True)
                    os.rename(tmp, dest)
                # else: a concurrent download won; use its copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model_checkpoint(dest)


def _require_downloaded(folder: Path, name: str, version: int) -> None:
    """A download with no MLmodel means the version's files are not where the store says (a home copied without
    its mlartifacts, or a store whose locations name a place that is gone): say that, not "not a model folder"."""
    if (folder / "MLmodel").is_file():
        return
    from mlflow.tracking import MlflowClient

    where = MlflowClient().get_model_version_download_uri(name, str(version))
    raise CpmantError(f"the files of models:/{name}/{version} are missing: nothing at {where}",
                      "restore them there (a home is copied or moved whole, mlflow.db with mlartifacts/; the "
                      "locations follow a moved home by themselves), or register the checkpoint again")


def model_checkpoint(model_folder: Path) -> Path:
    """The checkpoint folder inside a logged pyfunc model's folder (its `checkpoint` artifact)."""
    try:
        mlmodel = yaml.safe_load((model_folder / "MLmodel").read_text(encoding="utf-8"))
        rel = mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise CpmantError(f"{model_folder} is not a cpmant model folder (no checkpoint artifact in MLmodel: {e})",
                          "pass a model registered by cpmant, or a checkpoint folder") from None
    return model_folder / rel


def cache_inputs(tags: dict, run_id: str | None, source: str | None) -> dict:
    """What a version is, not where it is numbered: its files' sha256 tags, its run and its logged model."""
    return {"files": dict(sorted((k[len(FILE_SHA256_PREFIX):], v) for k, v in tags.items()
                                 if k.startswith(FILE_SHA256_PREFIX))),
            "checkpoint_sha256": tags.get(CHECKPOINT_SHA256, ""), "run_id": run_id or "", "source": source or ""}


def cache_key(tags: dict, run_id: str | None, source: str | None) -> str:
    """The cache folder's key: a hash of `cache_inputs`. A new store's (or a re-created model's) version 1 never
    meets an old cached folder."""
    return sha256_json(cache_inputs(tags, run_id, source))[:16]


def cached_model(uri: str, verify: bool = True) -> tuple[str, Path, Path]:
    """(models:/NAME/VERSION, the logged model's folder, its checkpoint folder): downloaded once into
    CPMANT_HOME/cache/models, keyed by what the version is, and (with `verify`) every checkpoint file checked
    against the version's sha256 tags; a copy that fails is dropped from the cache."""
    from mlflow.tracking import MlflowClient

    setup_tracking()
    name, version = resolve_version(uri)
    mv = MlflowClient().get_model_version(name, str(version))
    expected = _hashes_of(mv.tags, name, version) if verify else {}
    dest = subdir("cache", "models", name) / f"{version}-{cache_key(mv.tags, mv.run_id, mv.source)}"
    ckpt = _download_model(name, version, dest)
    key_file = dest / CACHE_KEY_FILE  # why this folder is this version, written with it
    if not key_file.is_file():
        write_json_atomic(key_file, {"uri": f"models:/{name}/{version}", **cache_inputs(mv.tags, mv.run_id, mv.source)})
    if verify:
        try:
            verify_files(ckpt, expected, uri, remember=True)
        except CpmantError:
            shutil.rmtree(dest, ignore_errors=True)  # never keep a bad copy in the cache
            raise
    return f"models:/{name}/{version}", dest, ckpt


def checkpoint_dir(uri: str, verify: bool = True) -> Path:
    """A local, verified checkpoint folder for `uri` (registry versions are cached under CPMANT_HOME/cache/models);
    a local checkpoint folder is returned as is."""
    if not uri.startswith("models:/"):
        p = Path(uri).expanduser()
        if is_complete(p):
            return p
        if not p.exists():
            raise CpmantError(f"{uri} is neither a models:/ URI nor an existing folder",
                              "pass models:/NAME/VERSION, models:/NAME@ALIAS, or a folder with cpmant_meta.json")
        raise CpmantError(f"{uri} is neither a models:/ URI nor a complete checkpoint folder",
                          "pass models:/NAME/VERSION, models:/NAME@ALIAS, or a folder with cpmant_meta.json")
    return cached_model(uri, verify=verify)[2]


def download(uri: str, to: str | Path, merge: bool = False) -> Path:
    """`cpmant pull URI --to DIR`: the version's checkpoint files in DIR, each verified against its sha256 tag.

    A delta version gives its delta folder (delta weights, delta_config.json naming its base); with `merge`
    (`cpmant pull --merge`) it gives a plain checkpoint instead: the base with the LoRA delta folded into its
    weights (same logits), loadable with no base and no OpenDelta. `merge` on a plain version changes nothing."""
    to = Path(to).expanduser().resolve()
    if to.exists() and not to.is_dir():
        raise CpmantError(f"{to} is a file, not a folder", "pass --to a new or empty folder")
    if to.exists() and any(to.iterdir()):
        raise CpmantError(f"{to} is not empty", "pass --to a new or empty folder")
    parent = next((p for p in to.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CpmantError(f"{parent} is a file, so {to} cannot be made", "pass --to a new or empty folder")
    from cpmant.fsutil import check_writable

    check_writable(to, "--to", folder=True)  # before anything is downloaded
    setup_tracking()
    name, version = resolve_version(uri)
    expected = expected_hashes(name, version)
    if merge:
        from cpmant.delta.checkpoint import is_delta_checkpoint

        label, _, ckpt = cached_model(uri, verify=True)
        if is_delta_checkpoint(ckpt):
            _save_merged(label, ckpt, to)
            return to
    with tempfile.TemporaryDirectory(prefix=".cpmant-pull-", dir=to.parent if to.parent.is_dir() else None) as tmp:
        ckpt = _download_model(name, version, Path(tmp) / "model")
        verify_files(ckpt, expected, uri)
        try:
            to.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CpmantError(f"cannot make {to} ({e.strerror or e})", "pass --to a folder you can write") from None
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


def pull(uri: str, device: str = "cpu", merge: bool = False) -> PulledModel:
    """Resolve, download (cached), verify and load a version: `pull("models:/cpm-ant-tiny@champion").generate(...)`.

    A delta version comes composed with its base (see `load_model`). With `merge`, a delta's LoRA is folded into
    the base's weights: `.model` is a plain CPMAnt and `.path` a plain checkpoint folder (cached under
    CPMANT_HOME/cache/merged, made once per delta version)."""
    path = checkpoint_dir(uri)
    if merge and _is_delta(path):
        label = f"models:/{'/'.join(map(str, resolve_version(uri)))}" if uri.startswith("models:/") else str(path)
        from cpmant.checkpoint import recorded_sha256

        merged = subdir("cache", "merged") / recorded_sha256(path, DELTA_WEIGHTS_FILE)[:32]  # what the delta is
        if not is_complete(merged):
            _save_merged(label, path, merged)
        from cpmant.checkpoint import load_pretrained

        model, tok = load_pretrained(merged, device=device)
        return PulledModel(uri, merged, model, tok)
    model, tok = load_model(path, device=device)
    return PulledModel(uri, path, model, tok)


# ---- deltas: composed with their base on load --------------------------------------------------------------
def _is_delta(path: Path) -> bool:
    from cpmant.delta.checkpoint import is_delta_checkpoint

    return is_delta_checkpoint(path)


def base_of(delta_dir: str | Path, base: str | Path | None = None) -> Path:
    """The verified local checkpoint folder of a delta's base: `base` (a URI or folder) when given, else the
    `base_uri` its delta_config.json names, pulled through the cache (downloaded and verified once, shared by all
    its deltas). The base's sha256 is checked against the delta's when the delta is loaded."""
    from cpmant.delta.checkpoint import read_delta_config

    cfg = read_delta_config(delta_dir)
    ref = str(base) if base is not None else (cfg.get("base_uri") or "")
    if not ref:
        raise CpmantError(f"the delta {delta_dir} names no registered base (it was saved from a local base folder)",
                          "pass the base checkpoint it was trained on: load_model(delta, base=BASE_DIR)")
    try:
        return checkpoint_dir(ref)
    except CpmantError as e:
        raise CpmantError(f"the base of delta {delta_dir}, {ref}, cannot be loaded: {e.problem}",
                          "register or restore that exact base version (a delta only loads onto the base it was "
                          f"trained on, sha256 {str(cfg.get('base_sha256', ''))[:16]}…), or retrain the delta on "
                          "another base with `cpmant tune`") from None


def load_model(uri_or_dir: str | Path, device: str = "cpu", base: str | Path | None = None,
               merge: bool = False):
    """(model in eval mode, tokenizer) of a registry version or a local checkpoint folder, plain or delta.

    A delta is composed with its base (`base_of`); a base whose sha256 differs from the one the delta names is
    refused (CpmantError). `merge` folds a LoRA delta into the weights (a plain CPMAnt)."""
    from cpmant.checkpoint import load_pretrained

    path = checkpoint_dir(str(uri_or_dir))
    if not _is_delta(path):
        return load_pretrained(path, device=device)
    from cpmant.delta.checkpoint import load_delta, merge_delta

    model, tok = load_delta(base_of(path, base), path, device=device)
    if merge:
        model = merge_delta(model).eval()
    return model, tok


def _save_merged(label: str, delta_dir: Path, to: Path) -> Path:
    from cpmant.delta.checkpoint import read_delta_config, save_merged

    cfg = read_delta_config(delta_dir)
    base_dir = base_of(delta_dir)
    model, _ = load_model(delta_dir, merge=True)
    return save_merged(to, model, base_dir / "vocab.txt", meta={
        "merged_from": label, "delta_method": cfg["method"], "base_uri": cfg.get("base_uri", ""),
        "base_sha256": cfg.get("base_sha256", ""), "task": cfg.get("task", "")})
