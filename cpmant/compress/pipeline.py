"""One recipe applied to one parent checkpoint: prune -> distill -> quantize -> MoEfy (as the recipe lists), then
measured (parameters, bytes on disk, held-out LM loss and perplexity, loss increase over the parent, generation
speed) and saved as a self-describing checkpoint folder whose metadata names its parent."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..corpus import load_corpus
from ..encode import encode_documents
from ..errors import CpmantError
from ..generate import generate
from ..model import CPMAnt
from ..paths import subdir
from ..training.data import PretrainStream
from ..training.loop import evaluate
from .config import CompressConfig
from .recipe import Recipe

GEN_PROMPTS = ["床前明月光", "春眠不觉晓", "白日依山尽", "学而时习之"]


@dataclass
class CompressData:
    data_sha256: str
    train: list[np.ndarray] = field(repr=False)
    importance: list[np.ndarray] = field(repr=False)
    evaluation: list[np.ndarray] = field(repr=False)


def load_data(cfg: CompressConfig, vocab_path: Path, progress: bool = True) -> CompressData:
    """The corpus encoded with the parent's vocab; the held-out split is halved: one half scores importance, the
    other measures loss, so no choice is tuned on the numbers it is judged by."""
    c = load_corpus(Path(cfg.corpus) if cfg.corpus else None, valid_fraction=cfg.valid_fraction, seed=cfg.seed)
    cache = subdir("cache", "encoded")
    train = encode_documents(list(c.train), vocab_path, cache_dir=cache, progress=progress)
    valid = encode_documents(list(c.valid), vocab_path, cache_dir=cache, progress=progress)
    if len(valid) < 2:
        raise CpmantError("the held-out split has fewer than 2 documents", "use a larger corpus or valid_fraction")
    return CompressData(c.sha256, train, valid[0::2], valid[1::2])


def _streams(model: CPMAnt, data: CompressData, seq_len: int, seed: int):
    kw = dict(bos=6, eos=7, min_piece_tokens=8, max_piece_tokens=seq_len, seed=seed)  # as pretraining's default
    return (PretrainStream(data.train, model.config, seq_len, **kw),
            PretrainStream(data.importance, model.config, seq_len, **kw),
            PretrainStream(data.evaluation, model.config, seq_len, **kw))


def _numel(model: CPMAnt) -> int:
    return int(sum(t.numel() for t in model.state_dict().values()))


def _bytes_on_disk(model_dir: Path) -> int:
    return (model_dir / ckpt.WEIGHTS_FILE).stat().st_size


@torch.no_grad()
def generation_speed(model: CPMAnt, tokenizer, new_tokens: int) -> float:
    """New tokens per second, greedy, the four prompts one batch (KV cache), after one warm-up call."""
    generate(model, tokenizer, GEN_PROMPTS[:1], max_new_tokens=2)
    t0 = time.perf_counter()
    outs = generate(model, tokenizer, GEN_PROMPTS, max_new_tokens=new_tokens, repetition_penalty=1.0)
    dt = time.perf_counter() - t0
    n = sum(len(tokenizer.encode(o)) for o in outs) or len(GEN_PROMPTS) * new_tokens
    return n / dt


# the CompressConfig fields that change a variant's weights (not where it is written or how it is measured)
WEIGHT_FIELDS = ("corpus", "valid_fraction", "seed", "importance_rows", "batch_size", "backend")


def recipe_sha256(recipe: Recipe, cfg: CompressConfig) -> str:
    blob = json.dumps({"recipe": recipe.model_dump(mode="json"),
                       "compress": {k: getattr(cfg, k) for k in WEIGHT_FIELDS}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def compress_checkpoint(parent_dir: Path, recipe: Recipe, cfg: CompressConfig, out_dir: Path, *,
                        parent_uri: str = "", data: CompressData | None = None, callbacks=None,
                        progress: bool = True) -> dict:
    """Make, measure and save one variant; a finished variant with the same recipe and parent is reused."""
    from ..backends import get_backend
    from .distill import distill
    from .moefy import moefy
    from .prune import prune
    from .quantize import disable_qat, enable_qat, quantize_model

    get_backend("compress", cfg.backend)
    over = {k: v for k, v in {"steps": cfg.distill_steps, "micro_batch_size": cfg.distill_batch_size}.items()
            if v is not None}
    if over:
        recipe = recipe.model_copy(update={"distill": recipe.distill.model_copy(update=over)})
    out_dir = Path(out_dir)
    model_dir = out_dir / "model"
    parent_meta = ckpt.read_meta(parent_dir)
    sha = recipe_sha256(recipe, cfg)
    parent_sha = ckpt.sha256_file(Path(parent_dir) / ckpt.WEIGHTS_FILE)
    if ckpt.is_complete(model_dir):
        m = ckpt.read_meta(model_dir)
        if m.get("config_sha256") == sha and m.get("parent_checkpoint_sha256") == parent_sha and "report" in m:
            return m["report"]
        import shutil

        shutil.rmtree(model_dir)  # another recipe or parent: remade below (its distillation restarts too)
    teacher, tok = ckpt.load_pretrained(parent_dir)
    data = data or load_data(cfg, Path(parent_dir) / ckpt.VOCAB_FILE, progress=progress)
    seq_len = recipe.distill.seq_len
    train_s, imp_s, eval_s = _streams(teacher, data, seq_len, cfg.seed)
    imp_batches = [imp_s.batch(range(i, min(i + cfg.batch_size, cfg.importance_rows)), shuffle=True)
                   for i in range(0, cfg.importance_rows, cfg.batch_size)]
    parent_eval = evaluate(teacher, eval_s, cfg.eval_rows, cfg.batch_size)
    torch.manual_seed(recipe.distill.seed)
    student = copy.deepcopy(teacher)
    report: dict = {"recipe": recipe.name, "methods": list(recipe.methods), "parent": parent_uri,
                    "distill_steps": recipe.distill.steps if "distill" in recipe.methods else 0}
    t0 = time.perf_counter()
    for method in recipe.methods:
        if method == "prune":
            student, report["prune"] = prune(student, recipe.target_shape(teacher.config), imp_batches)
        elif method == "distill" and recipe.distill.steps > 0:
            if recipe.qat:
                enable_qat(student)  # fake-int8 weights (straight-through) while distilling
            r = distill(student, teacher, train_s, recipe.distill, out_dir / "checkpoints",
                        Path(parent_dir) / ckpt.VOCAB_FILE, callbacks=callbacks, progress=progress,
                        meta={"recipe": recipe.name, "config_sha256": sha, "parent_checkpoint_sha256": parent_sha})
            report["distill"] = asdict(r) | {"losses": None}
            if recipe.qat:
                disable_qat(student)
        elif method == "quantize":
            student = quantize_model(student)
        elif method == "moefy":
            student, report["moefy"] = moefy(student, imp_batches, recipe.moe_experts, recipe.moe_top_k)
    report["compress_seconds"] = time.perf_counter() - t0
    student.eval()
    ev = evaluate(student, eval_s, cfg.eval_rows, cfg.batch_size)
    att, ffn = student.config.kept()
    report.update({
        "attention_layers": att, "ffn_layers": ffn, "num_heads": student.config.num_heads,
        "dim_ff": student.config.dim_ff, "quantization": student.config.quantization or "",
        # state-dict elements: int8 weights and MoE routers are buffers, which num_parameters() leaves out
        "params": _numel(student), "parent_params": _numel(teacher),
        "lm_loss": ev["valid_loss"], "perplexity": ev["valid_perplexity"],
        "parent_lm_loss": parent_eval["valid_loss"],
        "loss_increase": ev["valid_loss"] / parent_eval["valid_loss"] - 1.0,
        "published_loss_increase": recipe.published_loss_increase,
        "generation_tokens_per_second": generation_speed(student, tok, cfg.gen_tokens),
        "parent_generation_tokens_per_second": generation_speed(teacher, tok, cfg.gen_tokens),
    })
    meta = {"stage": "compress", "recipe": recipe.name, "config_sha256": sha,
            "data_sha256": parent_meta.get("data_sha256", data.data_sha256), "parent": parent_uri,
            "parent_checkpoint_sha256": parent_sha}
    ckpt.save_model_dir(model_dir, student.state_dict(), student.config, Path(parent_dir) / ckpt.VOCAB_FILE,
                        meta={**meta, "report": report})
    report["bytes_on_disk"] = _bytes_on_disk(model_dir)
    report["parent_bytes_on_disk"] = _bytes_on_disk(Path(parent_dir))
    # the metadata holds the full report (bytes included) so that a rerun can reuse this variant as is
    full = {**ckpt.read_meta(model_dir), "report": report}
    ckpt.write_json_atomic(model_dir / ckpt.META_FILE, full)
    for k, v in list(report.items()):
        if isinstance(v, float) and not math.isfinite(v):
            report[k] = None
    return report
