"""Loss on CPM-Ant rows: the summed token loss of a batch (training and compression use it) and the validation pass.

`loss_sums(model, batch, precision="fp32")` -> (summed token cross-entropy, {task: summed loss of that task's targets});
`evaluate(model, stream, rows, batch_size, precision="fp32")` -> {"valid_loss", "valid_perplexity", "valid_tokens"}.
`precision` is resolved (fp32 / bf16: cpmant.precision.resolve_precision); bf16 autocasts the forward pass, the
cross-entropy stays fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model import CPMAnt
from ..precision import autocast
from .data import IGNORE, TASK_LM, TASK_MASK, Batch, PretrainStream


def loss_sums(model: CPMAnt, batch: Batch, precision: str = "fp32") -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Summed token loss of a batch (with its graph) and the per-task sums (detached, on the CPU; CPM-Live logs the
    loss of each task). Logits are projected only at the positions that have a target; fp32 cross-entropy."""
    device = model.input_embedding.weight.device
    b = batch.to(device)
    sel = b.target != IGNORE  # (B, L): the positions with a target
    with autocast(precision, device):
        logits = model(**b.model_inputs(), logits_at=sel)  # (N, V), row-major order of sel
    tok_loss = F.cross_entropy(logits.float(), b.target[sel], reduction="none")  # (N,)
    tok_task = b.task[sel]  # (N,) the task of each target's piece
    per_task = {t: tok_loss.detach()[tok_task == t].sum().cpu() for t in (TASK_MASK, TASK_LM)}
    return tok_loss.sum(), per_task


@torch.no_grad()
def evaluate(model: CPMAnt, stream: PretrainStream, rows: int, batch_size: int, precision: str = "fp32") -> dict:
    """Left-to-right LM loss on `rows` rows of a stream with fixed cut points (comparable over time). The rows are
    the first of the stream's seeded epoch-0 order: a fixed random sample, not the corpus's first documents."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(rows, len(stream))
    try:
        for start in range(0, n, batch_size):
            b = stream.batch(range(start, min(n, start + batch_size)), shuffle=True, task=TASK_LM)
            s, _ = loss_sums(model, b, precision)
            total += s.item()
            count += b.num_targets
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0)), "valid_tokens": count}
