"""Delta checkpoints: only the delta's weights, and the base they were trained on, named by URI and sha256.

A delta folder holds
- `delta.safetensors`: the delta's tensors only (for LoRA on `tiny`: 16,384 numbers), named as in the composed
  model (`encoder.layers.0.self_att.self_attention.project_q.lora.lora_A`, ...);
- `delta_config.json`: `method`, `params` (the method's full params), `base_uri` (`models:/NAME/VERSION`, or "" for
  a local base), `base_sha256` (the base's `model.safetensors` sha256, as its metadata records it), `base_config`
  (the base's config.json, so that a delta describes the model it composes to), `trainable_params`,
  `total_params`, `task`, `metrics`;
- `vocab.txt`: the base's vocab (the tokenizer of the composed model; copied so that a delta folder can be read
  without its base, e.g. to tokenize);
- `cpmant_meta.json`, written last: the same metadata as `cpmant.checkpoint` writes (`format: cpmant-delta`, every
  file's sha256 and size, code version), so that a folder that has it is complete, and every file is verified.

`full` fine-tuning is not a delta: it writes a plain checkpoint (`cpmant.checkpoint.save_model_dir`, every weight,
loadable with no base) plus the same `delta_config.json` (method `full`), which records its base for lineage.

Loading composes: the base is loaded (`cpmant.checkpoint.load_pretrained`), its `model.safetensors` sha256 must
equal the `base_sha256` the delta names (a delta never loads silently onto another base), the method's structure is
applied and the delta's tensors are loaded strictly (every delta tensor, nothing else, same shapes).
`merge_delta` folds LoRA into the plain weights: W' = W + (alpha / r) * sqrt(dim_in) * B @ A (our Linear divides
its output by sqrt(dim_in); LoRA's branch adds x A^T B^T alpha / r after it), giving a plain CPMAnt.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import checkpoint as ck
from ..errors import CpmantError, a_or_an
from ..fsutil import fsync_dir, write_json_atomic
from .methods import DeltaHandle, apply_delta, get_method, method_params, total_parameters

DELTA_WEIGHTS_FILE = ck.DELTA_WEIGHTS_FILE
DELTA_CONFIG_FILE = "delta_config.json"
DELTA_FORMAT = "cpmant-delta"


def base_identity(base_dir: str | Path) -> str:
    """The sha256 a delta records for its base: the base's `model.safetensors`, as its metadata recorded it."""
    return ck.recorded_sha256(base_dir, ck.WEIGHTS_FILE)


def is_delta_checkpoint(path: str | Path) -> bool:
    """A complete folder holding delta weights (not a plain checkpoint, nor a `full` fine-tune, which is one)."""
    p = Path(path)
    if not ck.is_complete(p):
        return False
    if (p / DELTA_WEIGHTS_FILE).is_file():
        return True
    try:
        return ck.read_meta(p).get("format") == DELTA_FORMAT
    except CpmantError:
        return False


def read_delta_config(path: str | Path) -> dict:
    """The delta_config.json of a delta folder (or of a `full` fine-tune); a CpmantError when it has none."""
    f = Path(path) / DELTA_CONFIG_FILE
    if not f.is_file():
        raise CpmantError(f"{path} has no {DELTA_CONFIG_FILE}: it is not a delta checkpoint",
                          "pass a folder written by `cpmant tune` (save_delta)")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ck._damaged(Path(path), DELTA_CONFIG_FILE, f"it cannot be read: {ck._reason(e)}") from None
    if not isinstance(d, dict) or "method" not in d:
        raise ck._damaged(Path(path), DELTA_CONFIG_FILE, "it names no method")
    return d


def _delta_config(handle: DeltaHandle, base_dir: Path, base_uri: str, task: str, metrics: dict | None,
                  extra: dict | None) -> dict:
    base_cfg = json.loads((base_dir / ck.CONFIG_FILE).read_text(encoding="utf-8"))
    return {
        "format": DELTA_FORMAT,
        "method": handle.method,
        "params": handle.params.model_dump(mode="json"),
        "base_uri": base_uri or "",
        "base_sha256": base_identity(base_dir),
        "base_config": base_cfg,
        "trainable_params": handle.num_trainable,
        "total_params": total_parameters(handle.model),
        "task": task,
        "metrics": dict(metrics or {}),
        **(extra or {}),
    }


def save_delta(out_dir: str | Path, handle: DeltaHandle, base_dir: str | Path, base_uri: str = "", task: str = "",
               metrics: dict | None = None, state_dict: dict[str, torch.Tensor] | None = None,
               meta: dict | None = None, extra_config: dict | None = None) -> Path:
    """Write the delta of `handle` (trained on the base checkpoint `base_dir`, registered as `base_uri`) to
    `out_dir`, atomically, metadata last. `state_dict` overrides the handle's current tensors (the best epoch's).
    For `full` a plain checkpoint is written (every weight) with the same delta_config.json."""
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    cfg = _delta_config(handle, base_dir, base_uri, task, metrics, extra_config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict or handle.state_dict()).items()}
    vocab = base_dir / ck.VOCAB_FILE
    if handle.method == "full":
        from ..config import ModelConfig

        return ck.save_model_dir(out_dir, tensors, ModelConfig.from_dict(cfg["base_config"]),
                                 vocab if vocab.is_file() else None, meta={"delta_method": "full", **(meta or {})},
                                 extra_files={DELTA_CONFIG_FILE: lambda p: write_json_atomic(p, cfg)})
    need = ck.checkpoint_bytes(tensors)
    ck.check_free_space(out_dir.parent, need)  # a full disk: one error before writing (and while: below)
    tmp = ck.staging_dir(out_dir)
    with ck.disk_full_as_error(out_dir.parent, need, cleanup=tmp):
        save_file(tensors, str(tmp / DELTA_WEIGHTS_FILE), metadata={"format": "pt", "method": handle.method})
        write_json_atomic(tmp / DELTA_CONFIG_FILE, cfg)
        if vocab.is_file():
            shutil.copyfile(vocab, tmp / ck.VOCAB_FILE)
        written = [p for p in sorted(tmp.iterdir()) if p.is_file()]
        files = {p.name: ck._durable_sha256(p) for p in written}  # hashed once, here (as cpmant.checkpoint does)
        write_json_atomic(tmp / ck.META_FILE, {
            "format": DELTA_FORMAT, "format_version": ck.FORMAT_VERSION, "created_unix": time.time(),
            "git_sha": ck.git_sha(), "packages": ck.package_versions(),
            "num_parameters": int(sum(t.numel() for t in tensors.values())), "delta_method": handle.method,
            "base_uri": cfg["base_uri"], "base_sha256": cfg["base_sha256"],
            "files_sha256": files, "files_bytes": {p.name: p.stat().st_size for p in written}, **(meta or {}),
        })
        fsync_dir(tmp)
    if out_dir.exists():  # an incomplete leftover: replace it
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    return out_dir


def verify_delta(path: str | Path) -> None:
    """Every file of a delta folder present with its recorded size and sha256; else one CpmantError naming it."""
    folder = Path(path)
    meta = ck.read_meta(folder)
    for name in (DELTA_WEIGHTS_FILE, DELTA_CONFIG_FILE):
        if not (folder / name).is_file():
            raise ck._damaged(folder, name, "the file is missing")
    ck._check_sizes(folder, meta)
    for name, want in (meta.get("files_sha256") or {}).items():
        if ck.sha256_file(folder / name) != want:
            raise ck._damaged(folder, name, "its sha256 differs from the one recorded when it was saved")


def load_delta_weights(path: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(path)
    ck._check_sizes(folder, ck.read_meta(folder))
    f = folder / DELTA_WEIGHTS_FILE
    if not f.is_file():
        raise ck._damaged(folder, DELTA_WEIGHTS_FILE, "the file is missing")
    try:
        return load_file(str(f))
    except Exception as e:  # SafetensorError, OSError: one message whatever the reader says
        raise ck._damaged(folder, DELTA_WEIGHTS_FILE, f"truncated? it cannot be read: {ck._reason(e)}") from None


def check_base(base_dir: str | Path, delta_cfg: dict, delta_dir: str | Path = "") -> None:
    """Refuse a base whose weights are not the ones the delta was trained on."""
    want = delta_cfg.get("base_sha256") or ""
    got = base_identity(base_dir)
    if want != got:
        named = delta_cfg.get("base_uri") or "its base"
        raise CpmantError(
            f"the delta {delta_dir} was trained on {named} (model.safetensors sha256 {want[:16]}…) but the base "
            f"given, {base_dir}, has sha256 {got[:16]}…: a delta never loads onto another base",
            f"load it onto the base it names ({named}); retrain the delta on this base with `cpmant tune`")


def attach_delta(model: torch.nn.Module, delta_dir: str | Path, cfg: dict | None = None) -> DeltaHandle:
    """Apply the delta's method to `model` (a loaded base) and load its tensors strictly."""
    delta_dir = Path(delta_dir)
    cfg = cfg or read_delta_config(delta_dir)
    method = cfg["method"]
    get_method(method)
    params = method_params(method, cfg.get("params") or {})
    tensors = load_delta_weights(delta_dir)
    handle = apply_delta(model, method, params)
    want = {n: p.shape for n, p in handle.trainable()}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    bad = sorted(n for n in set(want) & set(tensors) if tuple(tensors[n].shape) != tuple(want[n]))
    if missing or extra or bad:
        what = "; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                     f"unexpected {extra[:3]}" if extra else "",
                                     f"other shapes {bad[:3]}" if bad else "") if x)
        raise CpmantError(f"{delta_dir / DELTA_WEIGHTS_FILE} does not fit {a_or_an(method)} delta on this base "
                          f"({what})",
                          "load the delta onto the base it names, with the params in its delta_config.json")
    params_by_name = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            p = params_by_name[n]
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return handle


def load_delta(base_dir: str | Path, delta_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, verify: bool = False):
    """(model, tokenizer): the base checkpoint `base_dir` with the delta of `delta_dir` composed, in eval mode.
    Refused (CpmantError) when the base's sha256 differs from the one the delta names. The base's sha256 is the one
    its metadata records; verify=True also hashes both folders' files against their metadata, so that a base whose
    weights were swapped under the same metadata is refused too."""
    delta_dir = Path(delta_dir)
    if verify:
        verify_delta(delta_dir)
    cfg = read_delta_config(delta_dir)
    if not is_delta_checkpoint(delta_dir):
        raise CpmantError(f"{delta_dir} is not a delta checkpoint (method {cfg.get('method')!r} saves every weight)",
                          "load it on its own with cpmant.checkpoint.load_pretrained")
    check_base(base_dir, cfg, delta_dir)
    model, tok = ck.load_pretrained(base_dir, device="cpu", dtype=dtype, verify=verify)
    attach_delta(model, delta_dir, cfg)
    return model.to(device).eval(), tok


def merge_delta(handle_or_model) -> torch.nn.Module:
    """A plain CPMAnt (no OpenDelta modules) with a LoRA delta folded into its weights: same logits."""
    from ..factory import build_model

    model = handle_or_model.model if isinstance(handle_or_model, DeltaHandle) else handle_or_model
    method = getattr(model, "_cpmant_delta", None)
    if method is None:
        return model
    if not get_method(method).mergeable:
        raise CpmantError(f"{a_or_an(method)} delta cannot be merged into the weights (only lora can)",
                          "load it composed (registry.pulling.load_model), or pull it without --merge")
    full = torch.nn.Module.state_dict(model)  # the unwrapped state dict (freeze_module narrowed model.state_dict)
    merged = {k: v.detach().clone() for k, v in full.items() if ".lora." not in k}
    for name, mod in model.named_modules():
        lora = getattr(mod, "lora", None)
        if lora is None or not hasattr(lora, "lora_A"):
            continue
        w = merged[f"{name}.weight"]
        if not w.is_floating_point():
            raise CpmantError(f"cannot merge LoRA into the {w.dtype} weights of {name} (an int8 variant: the sum is "
                              "not on its grid)", "load the delta composed (registry.pulling.load_model), or tune "
                              "a float base")
        dw = (lora.lora_B.detach().float() @ lora.lora_A.detach().float()) * (lora.scaling * mod.dim_in ** 0.5)
        merged[f"{name}.weight"] = (w.float() + dw).to(w.dtype)
    plain = build_model(model.config, meta=True)
    plain.load_state_dict(merged, strict=True, assign=True)
    dev = next(model.parameters()).device
    return plain.to(dev).train(model.training)


def save_merged(out_dir: str | Path, model: torch.nn.Module, vocab_path: str | Path | None,
                meta: dict | None = None) -> Path:
    """Save a merged model (from `merge_delta`) as a plain checkpoint folder."""
    sd = {k: v for k, v in torch.nn.Module.state_dict(model).items()}
    return ck.save_model_dir(out_dir, sd, model.config, vocab_path, meta=meta)
