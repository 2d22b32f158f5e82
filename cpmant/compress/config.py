"""The compression stage's config (recipes live in recipe.py, each method's settings in its own config).

The data is not chosen here: importance, distillation and evaluation read the corpus, split and vocab the parent
was trained with (its metadata, see cpmant/lineage.py); the LM loss is the lineage's held-out measure
(cpmant/heldout.py), whose rows the parent's metadata fixes.
"""

from __future__ import annotations


from pydantic import Field, field_validator, model_validator

from ..configio import FrozenModel
from ..precision import Precision

# fields that chose the data before compression followed its parent's data lineage
_REMOVED = ("corpus", "valid_fraction", "seed")


class CompressConfig(FrozenModel):
    recipes: str = Field("all,int8", description="recipes for the lifecycle: names, `all`, or YAML paths")
    importance_rows: int = Field(48, ge=1, description="held-out rows that score importance")
    batch_size: int = Field(16, ge=1, description="rows per forward pass when scoring importance")
    gen_tokens: int = Field(32, ge=1, description="new tokens per prompt when measuring generation speed")
    gen_repeats: int = Field(3, ge=1, description="timed generation calls (after one warm-up call)")
    distill_steps: int | None = Field(None, ge=0, description="overrides every recipe's distill.steps when set")
    distill_batch_size: int | None = Field(None, ge=1, description="overrides every recipe's distill batch size")
    precision: Precision = Field(
        "auto", description="matmul precision of distillation and importance scoring: auto = bf16 "
                            "autocast where the CPU multiplies bf16 natively, else fp32 (weights stay fp32)")
    backend: str = Field("torch", description="compression backend (cpmant.backends.backend_names('compress'))")
    output_dir: str | None = Field(None, description="None = $CPMANT_HOME/runs/compress-<base>")

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        if isinstance(data, dict):
            old = [k for k in _REMOVED if k in data]
            if old:
                raise ValueError(f"compress.{', compress.'.join(old)}: removed; compression reads the corpus, "
                                 "held-out split and vocab its parent was trained with (the parent's metadata); "
                                 "remove them (set pretrain.corpus / pretrain.valid_fraction / pretrain.seed instead)")
            if "eval_rows" in data:
                raise ValueError("compress.eval_rows: removed; the LM loss of a parent and its variants is the "
                                 "lineage's held-out measure (cpmant/heldout.py: the rows pretraining recorded, "
                                 "pretrain.eval_rows / seq_len / micro_batch_size); remove it")
        return data

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from ..backends import check_backend_name

        return check_backend_name("compress", v)

    @field_validator("recipes")
    @classmethod
    def _recipes(cls, v: str) -> str:
        from .recipe import check_recipe_spec

        check_recipe_spec(v)
        return v
