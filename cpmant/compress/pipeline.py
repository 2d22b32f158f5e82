"""One recipe applied to one parent checkpoint: the recipe's methods in order (each looked up in the method
registry), then measured (parameters, bytes on disk, held-out LM loss and perplexity, loss increase over the parent,
generation speed) and saved as a self-describing checkpoint folder whose metadata names its parent and its data.

Data lineage: importance, distillation and evaluation read the corpus, split and vocab the parent was trained with
(cpmant/lineage.py). Distillation trains on the parent's train split only; the parent's held-out split is halved:
one half scores importance (pruning, MoEfication), the other measures loss, so no choice is tuned on the numbers it
is judged by. The loss of the parent and of the variant is cpmant.heldout's measure (`heldout_loss`: the measured
half, the lineage's spec, fp32), the same number pretraining's `valid_loss_end` and validation's `lm_loss` are.

Reuse: one key per variant (`variant_key`, cpmant.hashing.sha256_json): the recipe with every method's config, the
CompressConfig fields the recipe uses, the parent's version URI and checkpoint sha256 (as its version records it),
the data hash, the held-out rows' identity (`heldout_sha256`: a changed measure is measured again) and the code
version. It is written in the variant's metadata (`config_sha256`) and on its registered version
(cpmant.inputs_sha256); tasks/compress.py looks it up in the registry, `compress_checkpoint` on disk.

Precision: `CompressConfig.precision` is resolved once per variant (on the CPU, where compression runs) and autocasts
distillation (student and teacher) and importance scoring (the held-out measure is always fp32); it is part of both
keys as the resolved value (`auto` on a bf16 machine is the same variant as `bf16`). Generation speed is measured
as generate_ids runs it.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..config import ModelConfig
from ..errors import CpmantError
from ..generate import GenerationConfig, generate_ids
from ..hashing import sha256_json
from ..heldout import HeldOutRows, calibration_docs, folder_heldout_sha256, heldout_loss, measured_docs
from ..lineage import DataLineage, load_lineage_data, read_lineage
from ..model import CPMAnt
from ..precision import resolve_precision
from ..tokenizer import BOS_ID, EOS_ID
from ..training.data import PretrainStream
from .config import CompressConfig
from .methods import METHODS, ROW_LENGTH, MethodContext
from .recipe import Recipe

GEN_PROMPTS = ["床前明月光", "春眠不觉晓", "白日依山尽", "学而时习之"]
# CompressConfig fields every recipe uses (evaluation and generation speed, the backend); methods add theirs
BASE_FIELDS = ("batch_size", "gen_tokens", "gen_repeats", "backend", "precision")
DEVICE = "cpu"  # where compression runs (the parent is loaded on the CPU)
# of those, the ones that change only the reported metrics, not the weights
# (the held-out measure's rows are the lineage's, cpmant/heldout.py: its identity is in the key, not a field here)
METRIC_FIELDS = ("gen_tokens", "gen_repeats")
# report entries that are settings, not measurements (params, not metrics)
NOT_METRICS = ("distill_steps", "final_step")


@dataclass
class CompressData:
    data_sha256: str
    lineage: DataLineage
    train: list[np.ndarray] = field(repr=False)  # the parent's train split
    importance: list[np.ndarray] = field(repr=False)  # held-out documents 0, 2, 4, ...
    evaluation: list[np.ndarray] = field(repr=False)  # held-out documents 1, 3, 5, ... (cpmant.heldout's rows)
    vocab_path: Path | None = None  # the parent's vocab (None: the parent folder's)

    def heldout(self, parent_dir: Path) -> HeldOutRows:
        """The held-out measure's rows (cpmant/heldout.py) of this data."""
        lin = self.lineage
        return HeldOutRows(self.evaluation, lin.heldout, lin.seed, lin.min_piece_tokens, lin.max_piece_tokens,
                           lin.data_sha256, ckpt.sha256_file(self.vocab_path or Path(parent_dir) / ckpt.VOCAB_FILE))


def load_data(parent_dir: Path, progress: bool = True) -> CompressData:
    """The parent's corpus, split and vocab (hash checked); the held-out split halved into importance / evaluation."""
    d = load_lineage_data(parent_dir, progress=progress)
    if len(d.valid) < 2:
        raise CpmantError(
            f"the held-out split {Path(parent_dir).name} was trained with has {len(d.valid)} document(s); compression "
            "needs 2 (one half scores importance, the other measures loss)",
            "pretrain the parent with a larger pretrain.valid_fraction or a larger corpus")
    return CompressData(d.lineage.data_sha256, d.lineage, d.train, calibration_docs(d.valid), measured_docs(d.valid),
                        d.vocab_path)


def build_streams(config: ModelConfig, data: CompressData, seq_len: int):
    """(train, importance, evaluation) streams with the parent's piece settings and data seed."""
    lin = data.lineage
    kw = dict(bos=BOS_ID, eos=EOS_ID, min_piece_tokens=lin.min_piece_tokens, max_piece_tokens=lin.max_piece_tokens,
              seed=lin.seed)
    return (PretrainStream(data.train, config, seq_len, **kw),
            PretrainStream(data.importance, config, seq_len, **kw),
            PretrainStream(data.evaluation, config, seq_len, **kw))


def _numel(model: CPMAnt) -> int:
    return int(sum(t.numel() for t in model.state_dict().values()))


def _bytes_on_disk(model_dir: Path) -> int:
    return (model_dir / ckpt.WEIGHTS_FILE).stat().st_size


# ---- generation speed ---------------------------------------------------------------------------------
def _generated_ids(model: CPMAnt, tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Greedy continuations as ids (not decoded text), KV cache, no repetition penalty."""
    return generate_ids(model, tokenizer, prompts, GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=1.0))


@torch.no_grad()
def generation_speed(model: CPMAnt, tokenizer, new_tokens: int, repeats: int = 3,
                     generate: Callable[[CPMAnt, object, list[str], int], list[list[int]]] = _generated_ids) -> float:
    """Generated ids per second: the four prompts as one batch, `repeats` timed calls after one warm-up call, each
    `generate(model, tokenizer, prompts, new_tokens)` (ids per prompt)."""
    was = model.training
    model.eval()
    try:
        generate(model, tokenizer, GEN_PROMPTS[:1], 2)
        n, t0 = 0, time.perf_counter()
        for _ in range(repeats):
            n += sum(len(ids) for ids in generate(model, tokenizer, GEN_PROMPTS, new_tokens))
        dt = time.perf_counter() - t0
    finally:
        model.train(was)
    return n / max(dt, 1e-9)


# ---- what a variant depends on ------------------------------------------------------------------------
def apply_overrides(recipe: Recipe, cfg: CompressConfig) -> Recipe:
    """The recipe with the CompressConfig overrides its methods declare (e.g. distill_steps -> distill.steps)."""
    for m in recipe.methods:
        update = {target: getattr(cfg, f) for f, target in METHODS[m.name].overrides.items()
                  if getattr(cfg, f) is not None}
        if update:
            recipe = recipe.with_method(m.name, **update)
    return recipe


def fields_used(recipe: Recipe) -> tuple[str, ...]:
    """The CompressConfig fields a recipe's run reads (overrides are folded into the recipe)."""
    return tuple(dict.fromkeys(BASE_FIELDS + tuple(f for m in recipe.methods for f in METHODS[m.name].uses)))


def compress_precision(cfg: CompressConfig) -> str:
    """The precision (fp32 / bf16) `cfg.precision` resolves to where compression runs."""
    return resolve_precision(cfg.precision, DEVICE)


def used_settings(recipe: Recipe, cfg: CompressConfig, metrics: bool = True) -> dict:
    """The CompressConfig fields a recipe uses (recipe with overrides applied), `precision` resolved; without
    the metric-only fields when `metrics` is False."""
    out = {k: getattr(cfg, k) for k in fields_used(recipe) if metrics or k not in METRIC_FIELDS}
    if "precision" in out:
        out["precision"] = compress_precision(cfg)
    return out


@dataclass(frozen=True)
class VariantKey:
    config_sha256: str  # the reuse key: every input of the weights or the reported metrics (tag cpmant.inputs_sha256)
    weights_sha256: str  # everything that affects the weights (what resumable distillation state must match)
    parent_checkpoint_sha256: str
    data_sha256: str
    git_sha: str


def variant_key(parent_dir: Path, recipe: Recipe, cfg: CompressConfig, parent_uri: str = "",
                parent_checkpoint_sha256: str = "") -> VariantKey:
    """The key of `recipe` (overrides applied) on the parent in `parent_dir` with `cfg`, under this code version:
    the recipe and its methods' configs, the CompressConfig fields it uses (precision resolved), the parent's
    version URI and checkpoint sha256, the data hash, the held-out rows' identity and the code version.
    `parent_checkpoint_sha256`: the sha256 the parent's version records (cpmant.checkpoint_sha256), so that its
    weights are not hashed again; hashed from the folder when not given."""
    recipe = apply_overrides(recipe, cfg)
    parent_sha = parent_checkpoint_sha256 or ckpt.sha256_file(Path(parent_dir) / ckpt.WEIGHTS_FILE)
    data_sha = read_lineage(parent_dir).data_sha256
    code = ckpt.git_sha()
    common = {"recipe": recipe.model_dump(mode="json"), "parent_checkpoint_sha256": parent_sha,
              "data_sha256": data_sha, "git_sha": code}
    weights = sha256_json({**common, "compress": used_settings(recipe, cfg, metrics=False)})
    full = sha256_json({**common, "stage": "compress", "parent": parent_uri, "compress": used_settings(recipe, cfg),
                        "heldout_sha256": folder_heldout_sha256(parent_dir)})
    return VariantKey(full, weights, parent_sha, data_sha, code)


def recipe_params(recipe: Recipe, cfg: CompressConfig) -> dict[str, str]:
    """What a recipe's run records as params: the recipe, its methods' configs, the CompressConfig fields it uses
    (`compress.precision` resolved), `precision` (resolved: fp32 / bf16) with `precision_setting` (auto / fp32 /
    bf16), and the published reference figure (a param: it is not a measurement)."""
    recipe = apply_overrides(recipe, cfg)
    out = {"recipe.name": recipe.name, "recipe.methods": ",".join(recipe.method_names),
           "recipe.published_loss_increase": str(recipe.published_loss_increase)}
    for m in recipe.methods:
        out.update({f"{m.name}.{k}": str(v) for k, v in m.model_dump(mode="json").items() if k != "name"})
    out.update({f"compress.{k}": str(v) for k, v in used_settings(recipe, cfg).items()})
    out.update({"precision": compress_precision(cfg), "precision_setting": cfg.precision})
    return out


def final_metrics(report: dict) -> dict[str, float]:
    """The report's measurements (numbers; settings and reference figures left out)."""
    return {k: float(v) for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in NOT_METRICS and v is not None and math.isfinite(float(v))}


def describe_variant(recipe: Recipe, parent_uri: str, report: dict) -> str:
    """e.g. "3b recipe of models:/cpm-ant-tiny/1: 3 attention / 3 FFN layers, 1.29 M parameters, loss +0.4%"."""
    parts = [s for m in recipe.methods if (s := m.summary())]
    parts.append(f"{report['attention_layers']} attention / {report['ffn_layers']} FFN layers")
    parts.append(f"{report['params'] / 1e6:.2f} M parameters")
    inc = report.get("loss_increase")
    if inc is not None and math.isfinite(inc):
        parts.append(f"loss {inc:+.1%}")
    return f"{recipe.name} recipe of {parent_uri or 'its parent'}: " + ", ".join(parts)


# ---- the variant ----------------------------------------------------------------------------------------
def compress_checkpoint(parent_dir: Path, recipe: Recipe, cfg: CompressConfig, out_dir: Path, *,
                        parent_uri: str = "", data: CompressData | None = None, callbacks=None,
                        progress: bool = True, key: VariantKey | None = None) -> dict:
    """Make, measure and save one variant under out_dir/model; a finished one made with the same reuse key (its
    metadata's config_sha256) is returned as it is (a variant whose registration failed is not made again).
    `key`: the variant's key when the caller computed it (variant_key, once per variant)."""
    from ..backends import get_backend

    get_backend("compress", cfg.backend)
    recipe = apply_overrides(recipe, cfg)
    parent_dir, out_dir = Path(parent_dir), Path(out_dir)
    model_dir = out_dir / "model"
    key = key or variant_key(parent_dir, recipe, cfg, parent_uri)
    if ckpt.is_complete(model_dir):
        m = ckpt.read_meta(model_dir)
        if m.get("config_sha256") == key.config_sha256 and "report" in m:
            return m["report"]
        shutil.rmtree(model_dir)  # another recipe, parent, data, setting or code: remade below
    teacher, tok = ckpt.load_pretrained(parent_dir)
    data = data or load_data(parent_dir, progress=progress)
    if data.data_sha256 != key.data_sha256:
        raise CpmantError(f"the data given ({data.data_sha256[:16]}...) is not the data {parent_dir} was trained "
                          f"with ({key.data_sha256[:16]}...)", "pass data=None: the parent's data is loaded")
    seq_len = next((n for m in recipe.methods if (n := m.row_length()) is not None), ROW_LENGTH)
    train_s, imp_s, _ = build_streams(teacher.config, data, seq_len)
    precision = compress_precision(cfg)  # once per variant
    heldout = data.heldout(parent_dir)
    parent_eval = heldout_loss(teacher, heldout)
    imp_cache: list = []

    def importance_batches():
        if not imp_cache:
            imp_cache.extend(imp_s.batch(range(i, min(i + cfg.batch_size, cfg.importance_rows)), shuffle=True)
                             for i in range(0, cfg.importance_rows, cfg.batch_size))
        return imp_cache

    torch.manual_seed(0)  # one RNG state for every recipe (each method that draws seeds its own generator too)
    report: dict = {"recipe": recipe.name, "methods": recipe.method_names, "parent": parent_uri,
                    "precision": precision}
    ctx = MethodContext(teacher=teacher, student=copy.deepcopy(teacher), train_stream=train_s,
                        importance_batches=importance_batches, work_dir=out_dir,
                        vocab_path=parent_dir / ckpt.VOCAB_FILE, callbacks=callbacks, progress=progress,
                        identity={"recipe": recipe.name, "weights_sha256": key.weights_sha256}, report=report,
                        precision=precision)
    t0 = time.perf_counter()
    for m in recipe.methods:
        ctx.student = METHODS[m.name].apply(ctx, m)
    report["compress_seconds"] = time.perf_counter() - t0
    report["distill_steps"] = report["final_step"] = ctx.step
    student = ctx.student.eval()
    ev = heldout_loss(student, heldout)
    att, ffn = student.config.kept()
    parent_att, parent_ffn = teacher.config.kept()
    report.update({
        "attention_layers": att, "ffn_layers": ffn, "num_heads": student.config.num_heads,
        "dim_ff": student.config.dim_ff, "quantization": student.config.quantization or "",
        # the parent's shape: the ladder's base row (tasks/compress.py)
        "parent_attention_layers": parent_att, "parent_ffn_layers": parent_ffn,
        "parent_num_heads": teacher.config.num_heads, "parent_dim_ff": teacher.config.dim_ff,
        # state-dict elements: int8 weights and MoE routers are buffers, which num_parameters() leaves out
        "params": _numel(student), "parent_params": _numel(teacher),
        "lm_loss": ev["lm_loss"], "perplexity": ev["perplexity"], "eval_tokens": ev["tokens"],
        "parent_lm_loss": parent_eval["lm_loss"], "parent_perplexity": parent_eval["perplexity"],
        "loss_increase": ev["lm_loss"] / parent_eval["lm_loss"] - 1.0, "heldout_sha256": heldout.sha256,
        "generation_tokens_per_second": generation_speed(student, tok, cfg.gen_tokens, cfg.gen_repeats),
        "parent_generation_tokens_per_second": generation_speed(teacher, tok, cfg.gen_tokens, cfg.gen_repeats),
    })
    meta = {"stage": "compress", "recipe": recipe.name, "recipe_config": recipe.model_dump(mode="json"),
            "compress_config": used_settings(recipe, cfg),
            "config_sha256": key.config_sha256, "weights_sha256": key.weights_sha256,
            "data_sha256": key.data_sha256, "data": data.lineage.to_meta(), "parent": parent_uri,
            "parent_checkpoint_sha256": key.parent_checkpoint_sha256}
    ckpt.save_model_dir(model_dir, student.state_dict(), student.config, parent_dir / ckpt.VOCAB_FILE,
                        meta={**meta, "report": report})
    report["bytes_on_disk"] = _bytes_on_disk(model_dir)
    report["parent_bytes_on_disk"] = _bytes_on_disk(parent_dir)
    for k, v in list(report.items()):
        if isinstance(v, float) and not math.isfinite(v):
            report[k] = None
    # the metadata holds the full report (bytes included) so that a rerun can reuse this variant as is
    from ..fsutil import write_json_atomic

    write_json_atomic(model_dir / ckpt.META_FILE, {**ckpt.read_meta(model_dir), "report": report})
    return report
