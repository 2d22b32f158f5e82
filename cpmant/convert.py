"""Converters between our format, CPM-Live's, and transformers' `CpmAntForCausalLM` (4.45.x).

- CPM-Live: one `torch.save` state dict (fp16) + a config JSON. Its keys equal ours, so only dtypes change.
- transformers: keys under `cpmant.`; the prompt table is appended to the token table in `cpmant.input_embedding`
  (rows [0, vocab) tokens, row vocab + r = prompt row r, so task t's prompt is rows vocab + t*P .. vocab + (t+1)*P-1;
  HF hard-codes task 2 and segment 2); `lm_head.weight` is tied to that merged table. HF uses plain nn.Linear and
  nn.Embedding, so CPM-Live's scalings are folded into the weights: every Linear weight / sqrt(dim_in), the token,
  prompt and segment tables / sqrt(dim_model) (the tied head then gives h @ E.T / sqrt(D), as ours does).
- ours: a folder with model.safetensors + config.json + cpmant_meta.json (cpmant.checkpoint).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CpmantError

FORMATS = ("cpmant", "hf", "cpm-live")
CPM_LIVE_WEIGHTS = "pytorch_model.pt"


# ---- our keys ---------------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a CPMAnt state dict with its shape (CPM-Live's names, no prefix)."""
    c = config
    D, HD = c.dim_model, c.num_heads * c.dim_head
    shapes: dict[str, tuple[int, ...]] = {
        "input_embedding.weight": (c.vocab_size, D),
        "prompt_embedding.weight": (c.prompt_types * c.prompt_length, D),
        "segment_embedding.weight": (c.segment_types, D),
        "position_bias.relative_attention_bias": (c.segment_types**2 + c.position_bias_num_buckets, c.num_heads),
        "encoder.output_layernorm.weight": (D,),
    }
    masks = c.mask_modules or [(False, False)] * c.num_layers
    for i, (mask_att, mask_ffn) in enumerate(masks):
        p = f"encoder.layers.{i}."
        if not mask_att:
            shapes[p + "self_att.layernorm_before_attention.weight"] = (D,)
            for n in ("q", "k", "v"):
                shapes[p + f"self_att.self_attention.project_{n}.weight"] = (HD, D)
            shapes[p + "self_att.self_attention.attention_out.weight"] = (D, HD)
        if not mask_ffn:
            shapes[p + "ffn.layernorm_before_ffn.weight"] = (D,)
            shapes[p + "ffn.ffn.w_in.w_0.weight"] = (c.dim_ff, D)
            shapes[p + "ffn.ffn.w_in.w_1.weight"] = (c.dim_ff, D)
            shapes[p + "ffn.ffn.w_out.weight"] = (D, c.dim_ff)
    return shapes


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def validate_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, source: str = "state dict") -> None:
    """Raise CpmantError naming missing, unexpected and mis-shaped keys."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    shaped = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {want[k]}"
        for k in set(want) & set(state_dict)
        if tuple(state_dict[k].shape) != want[k]
    )
    if missing or unexpected or shaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
        if shaped:
            parts.append(f"{len(shaped)} wrong shapes: {_short(shaped, 3)}")
        raise CpmantError(
            f"{source} does not match the model config: " + "; ".join(parts),
            "use the config JSON that was saved with these weights (mask_modules, num_heads and dim_ff must match)",
        )


# ---- CPM-Live ---------------------------------------------------------------------------------------
def _load_tensors_pt(path: str | Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """A torch.save'd {name: tensor} read with weights_only=True (never pickled code); anything else is refused with
    our own message: the loader's text may advise turning that protection off, which must never reach a user."""
    try:
        try:  # a zip-format file (torch >= 1.6, as CPM-Live saves) is mapped, not read into memory: the 10B is 18.8 GB
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy format cannot be mapped: read it
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # UnpicklingError, RuntimeError (not a zip / truncated), EOFError, OSError, ...
        raise CpmantError(f"{path} is not {what}: it is not a torch.save file of tensors, or it is damaged",
                          fix) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CpmantError(f"{path} is not {what}: it does not hold a state dict (names -> tensors)", fix)
    return sd


def cpm_live_config(path: str | Path) -> ModelConfig:
    """Read a CPM-Live config JSON (config/cpm-ant-*.json); keys we do not model are dropped with a warning."""
    d = _json(Path(path))
    if not d:
        raise CpmantError(f"{path} is not a CPM-Live config JSON", "pass config/cpm-ant-*.json of CPM-Live")
    known = set(ModelConfig.__dataclass_fields__)
    extra = sorted(set(d) - known - {"emb_init_std"})
    if extra:
        warnings.warn(f"CPM-Live config {path}: ignoring keys {extra}", stacklevel=2)
    return ModelConfig.from_dict({k: v for k, v in d.items() if k in known})


def from_cpm_live(
    weights_path: str | Path, config_path: str | Path, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """CPM-Live `torch.save` state dict + config JSON -> (our state dict, config). dtype None keeps the stored one."""
    config = cpm_live_config(config_path)
    sd = _load_tensors_pt(weights_path, "a CPM-Live checkpoint", "pass CPM-Live's pytorch_model.pt (a torch.save "
                          "of its state dict) with the config JSON it was trained with")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    validate_state_dict(sd, config, f"CPM-Live checkpoint {weights_path}")
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd, config


def refuse_compressed(config: ModelConfig, target: str) -> None:
    """Raise for int8-quantized or MoEfied models: neither CPM-Live nor transformers can express them."""
    if config.quantization is not None or config.moe_experts is not None:
        raise CpmantError(
            f"{target} has no int8 weights or MoE routers: a model with quantization={config.quantization!r}, "
            f"moe_experts={config.moe_experts!r} cannot be converted",
            "keep this model in the cpmant format, or convert its dense parent (before quantize / moefy)",
        )


def to_cpm_live(state_dict: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path) -> Path:
    """Write CPM-Live's format: `pytorch_model.pt` (torch.save of fp16 tensors) and `config.json`. Returns out_dir."""
    refuse_compressed(config, "CPM-Live's format")
    validate_state_dict(state_dict, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state_dict.items()}
    torch.save(sd, out_dir / CPM_LIVE_WEIGHTS)
    d = config.to_dict()
    d.update(half=True, emb_init_std=1.0)
    if d["mask_modules"] is None:
        del d["mask_modules"]
    (out_dir / "config.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    return out_dir


# ---- transformers -----------------------------------------------------------------------------------
_LINEAR_SUFFIXES = (
    "self_attention.project_q.weight",
    "self_attention.project_k.weight",
    "self_attention.project_v.weight",
    "self_attention.attention_out.weight",
    "ffn.w_in.w_0.weight",
    "ffn.w_in.w_1.weight",
    "ffn.w_out.weight",
)


def _is_linear(key: str) -> bool:
    return key.startswith("encoder.layers.") and key.endswith(_LINEAR_SUFFIXES)


def to_hf_config(config: ModelConfig):
    """Our ModelConfig -> transformers.CpmAntConfig (raises for mask_modules, which HF cannot express)."""
    refuse_compressed(config, "transformers' CpmAntForCausalLM")
    from transformers import CpmAntConfig

    if config.mask_modules is not None and any(a or f for a, f in config.mask_modules):
        raise CpmantError(
            "transformers' CpmAntForCausalLM has no mask_modules: a model with removed sub-blocks cannot be converted",
            "keep this model in the cpmant or cpm-live format",
        )
    return CpmAntConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim_model,
        num_attention_heads=config.num_heads,
        dim_head=config.dim_head,
        dim_ff=config.dim_ff,
        num_hidden_layers=config.num_layers,
        dropout_p=config.dropout_p,
        position_bias_num_buckets=config.position_bias_num_buckets,
        position_bias_max_distance=config.position_bias_max_distance,
        eps=config.eps,
        init_std=1.0,
        prompt_types=config.prompt_types,
        prompt_length=config.prompt_length,
        segment_types=config.segment_types,
        torch_dtype="float16" if config.half else "float32",
        architectures=["CpmAntForCausalLM"],
    )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> CpmAntForCausalLM's, scalings folded (computed in fp32, stored in the source dtype)."""
    to_hf_config(config)  # refuses mask_modules
    validate_state_dict(state_dict, config)
    rd = 1.0 / math.sqrt(config.dim_model)
    out = {}
    for k, v in state_dict.items():
        if k in ("input_embedding.weight", "prompt_embedding.weight"):
            continue
        w = v.float()
        if k == "segment_embedding.weight":
            w = w * rd
        elif _is_linear(k):
            w = w * (1.0 / math.sqrt(v.shape[1]))
        out["cpmant." + k] = w.to(v.dtype)
    emb = state_dict["input_embedding.weight"]
    merged = torch.cat([emb.float(), state_dict["prompt_embedding.weight"].float()]) * rd  # (V + T*P, D)
    out["cpmant.input_embedding.weight"] = merged.to(emb.dtype)
    out["lm_head.weight"] = out["cpmant.input_embedding.weight"]  # tied
    return out


def from_hf_config(hf_config) -> ModelConfig:
    """transformers.CpmAntConfig (or its dict) -> ModelConfig."""
    d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    if d.get("model_type", "cpmant") != "cpmant":
        raise CpmantError(f"config has model_type {d.get('model_type')!r}", "pass a CpmAntConfig (model_type cpmant)")
    dtype = str(d.get("torch_dtype") or "float32").replace("torch.", "")
    return ModelConfig(
        vocab_size=d["vocab_size"],
        dim_model=d["hidden_size"],
        dim_ff=d["dim_ff"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        dim_head=d["dim_head"],
        dropout_p=float(d.get("dropout_p") or 0.0),
        eps=d["eps"],
        position_bias_num_buckets=d["position_bias_num_buckets"],
        position_bias_max_distance=d["position_bias_max_distance"],
        prompt_types=d["prompt_types"],
        prompt_length=d["prompt_length"],
        segment_types=d["segment_types"],
        half=dtype == "float16",
    )


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], hf_config) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """CpmAntForCausalLM's (or CpmAntModel's) state dict -> (our state dict, config); scalings unfolded."""
    config = from_hf_config(hf_config)
    rd = math.sqrt(config.dim_model)
    sd = {}
    for k, v in hf_sd.items():
        if k == "lm_head.weight":
            continue  # tied to cpmant.input_embedding.weight
        k = k.removeprefix("cpmant.")
        w = v.float()
        if k == "input_embedding.weight":
            V = config.vocab_size
            if w.shape[0] != V + config.prompt_types * config.prompt_length:
                raise CpmantError(
                    f"HF input_embedding has {w.shape[0]} rows, expected vocab {V} + prompt_types*prompt_length "
                    f"{config.prompt_types * config.prompt_length}",
                    "check that config.json belongs to these weights",
                )
            sd["input_embedding.weight"] = (w[:V] * rd).to(v.dtype)
            sd["prompt_embedding.weight"] = (w[V:] * rd).to(v.dtype)
            continue
        if k == "segment_embedding.weight":
            w = w * rd
        elif _is_linear(k):
            w = w * math.sqrt(v.shape[1])
        sd[k] = w.to(v.dtype)
    validate_state_dict(sd, config, "HF checkpoint")
    return sd, config


# ---- folders: detect, read, write -------------------------------------------------------------------
def _json(path: Path) -> dict:
    """The JSON object in path, or {} when it is missing, unreadable or not an object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _cpm_live_files(src: Path) -> tuple[Path, Path] | None:
    """(weights .pt, config .json) of a CPM-Live checkpoint at src (a folder or the .pt file), or None."""
    if src.is_file() and src.suffix == ".pt":
        folder, pts = src.parent, [src]
    elif src.is_dir():
        folder, pts = src, sorted(src.glob("*.pt"))
    else:
        return None
    if not pts:
        return None
    if len(pts) > 1:
        raise CpmantError(f"{src} holds several .pt files: {[p.name for p in pts]}", "pass the .pt file itself")
    jsons = [folder / "config.json"] if (folder / "config.json").exists() else sorted(folder.glob("*.json"))
    jsons = [j for j in jsons if "dim_model" in _json(j)]
    if len(jsons) != 1:
        raise CpmantError(
            f"found {len(jsons)} CPM-Live config JSONs (with dim_model) beside {pts[0]}",
            "put exactly one, e.g. config.json copied from CPM-Live's config/cpm-ant-10b.json, beside the .pt file",
        )
    return pts[0], jsons[0]


def detect_format(src: str | Path) -> str:
    """'cpmant', 'hf' or 'cpm-live', from the files present at src."""
    src = Path(src)
    if not src.exists():
        raise CpmantError(f"{src} does not exist", "check the path of the checkpoint to convert")
    if src.is_dir():
        if all((src / f).exists() for f in ("model.safetensors", "config.json", "cpmant_meta.json")):
            return "cpmant"
        if _json(src / "config.json").get("model_type") == "cpmant" and (
            (src / "model.safetensors").exists() or (src / "pytorch_model.bin").exists()
        ):
            return "hf"
    if _cpm_live_files(src) is not None:
        return "cpm-live"
    raise CpmantError(
        f"cannot tell the format of {src}",
        "give a cpmant folder (model.safetensors + config.json + cpmant_meta.json), an HF folder (config.json with "
        '"model_type": "cpmant" + model.safetensors or pytorch_model.bin), or a CPM-Live *.pt with its config JSON',
    )


def read_any(src: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, Path | None, str]:
    """Read a checkpoint in any of the three formats: (our state dict, config, vocab path or None, format)."""
    src = Path(src)
    fmt = detect_format(src)
    folder = src if src.is_dir() else src.parent
    if fmt == "cpmant":
        from .checkpoint import load_model_dir

        config, sd, vocab, _ = load_model_dir(src)
        return sd, config, vocab, fmt
    if fmt == "hf":
        fix = "convert the model again from its source (transformers' save_pretrained writes these files)"
        if (src / "model.safetensors").exists():
            from safetensors.torch import load_file

            try:
                hf_sd = load_file(str(src / "model.safetensors"))
            except Exception as e:  # SafetensorError, OSError
                raise CpmantError(f"{src / 'model.safetensors'} is damaged (truncated?): it cannot be read "
                                  f"({type(e).__name__})", fix) from None
        else:
            hf_sd = _load_tensors_pt(src / "pytorch_model.bin", "a transformers checkpoint", fix)
        sd, config = from_hf_state_dict(hf_sd, _json(src / "config.json"))
    else:
        pt, cfg = _cpm_live_files(src)
        sd, config = from_cpm_live(pt, cfg)
    vocab = folder / "vocab.txt"
    return sd, config, (vocab if vocab.exists() else None), fmt


def save_hf(state_dict: dict[str, torch.Tensor], config: ModelConfig, dst: str | Path) -> Path:
    """Write a transformers folder (CpmAntForCausalLM.save_pretrained, safetensors)."""
    from transformers import CpmAntForCausalLM

    hf_config = to_hf_config(config)
    hf_sd = to_hf_state_dict(state_dict, config)
    hf_config.torch_dtype = str(hf_sd["lm_head.weight"].dtype).removeprefix("torch.")
    with torch.device("meta"):  # no random init of weights we overwrite
        model = CpmAntForCausalLM(hf_config)
    model.load_state_dict(hf_sd, strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(dst, safe_serialization=True)
    return Path(dst)


def convert(src: Path, dst: Path, to: str) -> Path:
    """Convert the checkpoint at src (any format) into format `to` ('cpmant', 'hf', 'cpm-live') at dst."""
    if to not in FORMATS:
        raise CpmantError(f"unknown target format {to!r}", f"use one of {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CpmantError(f"{dst} already exists and is not empty", "choose a new destination folder")
    sd, config, vocab, fmt = read_any(src)
    if to == "cpmant":
        from .checkpoint import save_model_dir

        meta = {"converted_from": {"format": fmt, "path": str(src.resolve())}}
        return save_model_dir(dst, sd, config, vocab, meta)
    if to == "hf":
        save_hf(sd, config, dst)
    else:
        to_cpm_live(sd, config, dst)
    if vocab is not None:
        shutil.copyfile(vocab, dst / "vocab.txt")
    return dst
