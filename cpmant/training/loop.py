"""The torch pretraining loop: one function a test, a notebook, a Prefect task or torchrun can call.

Exactness across process counts: every micro-batch's summed token loss is divided by the number of targets in the
whole global batch (all ranks, all micro-batches), and gradients are summed over ranks, so N processes with
micro-batches of B rows compute the same update as one process accumulating N*B rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from ..backends import get_backend
from ..config import ModelConfig, get_preset
from ..configio import dump_config
from ..errors import CpmantError
from ..flops import flops_per_token, measure_matmul_peak
from ..model import CPMAnt
from ..paths import subdir
from .config import PretrainConfig
from .data import IGNORE, TASK_LM, TASK_MASK, Batch, PretrainStream
from .distributed import (DistInfo, all_reduce_grads, all_reduce_sum, barrier, cleanup, init_distributed,
                          pick_device)
from .prepare import PreparedData, prepare_data
from .schedule import SCHEDULES


class Callbacks(Protocol):
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path  # the final model folder (complete, self-describing)
    model_config: dict
    steps: int
    final_loss: float
    valid_loss_start: float | None
    valid_loss_end: float
    tokens_seen: int
    tokens_per_second: float
    train_seconds: float
    mfu: float
    peak_flops: float
    num_parameters: int
    resumed_from: int
    data: dict = field(default_factory=dict)
    config_sha256: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["run_dir"], d["model_dir"] = str(self.run_dir), str(self.model_dir)
        return d


def config_sha256(cfg: PretrainConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode("utf-8")).hexdigest()


def resolve_run_dir(cfg: PretrainConfig) -> Path:
    if cfg.output_dir:
        p = Path(cfg.output_dir).expanduser().resolve()
        p.mkdir(parents=True, exist_ok=True)
        return p
    return subdir("runs", f"pretrain-{cfg.preset}")


def build_model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    base = get_preset(cfg.preset)
    try:
        return base.replace(**{**cfg.model_overrides, "vocab_size": vocab_size})
    except TypeError as e:
        raise CpmantError(f"model_overrides: {e}", f"use ModelConfig fields: {sorted(base.to_dict())}") from e


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "position_bias" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _loss_sums(model: CPMAnt, b: Batch, bf16: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Summed token loss of a batch and the per-task sums (for CPM-Live's per-task log)."""
    device = model.input_embedding.weight.device
    b = b.to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    sel = b.target != IGNORE  # (B, L): the positions with a target
    with ctx:
        logits = model(**b.model_inputs(), logits_at=sel)  # (N, V): projected only where there are targets
    tok_loss = F.cross_entropy(logits.float(), b.target[sel], reduction="none")  # (N,)
    rows = sel.nonzero()[:, 0]
    per_row = torch.zeros(sel.size(0), dtype=tok_loss.dtype, device=tok_loss.device).index_add_(0, rows, tok_loss)
    per_task = {t: per_row[b.task == t].sum().detach().cpu() for t in (TASK_MASK, TASK_LM)}
    return per_row.sum(), per_task


@torch.no_grad()
def evaluate(model: CPMAnt, stream: PretrainStream, rows: int, batch_size: int, bf16: bool = False) -> dict:
    """Left-to-right LM loss on `rows` rows of a stream with fixed cut points (comparable over time). The rows are
    the first of the stream's seeded epoch-0 order: a fixed random sample, not the corpus's first documents."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(rows, len(stream))
    for start in range(0, n, batch_size):
        b = stream.batch(range(start, min(n, start + batch_size)), shuffle=True, task=TASK_LM)
        s, _ = _loss_sums(model, b, bf16)
        total += s.item()
        count += b.num_targets
    model.train(was_training)
    loss = total / max(count, 1)
    return {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 50.0)), "valid_tokens": count}


class _JsonlLog:
    """CPM-Live's machine log: one JSON line per iteration. On resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if path.exists():
            keep = []
            for ln in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(ln).get("iter", 0) <= resume_step:
                        keep.append(ln)
                except ValueError:  # a line cut short by a killed run
                    continue
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
            os.replace(tmp, path)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.enabled:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.enabled:
            self.f.close()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def pretrain(cfg: PretrainConfig, callbacks: Callbacks | None = None, prepared: PreparedData | None = None,
             progress: bool = True) -> TrainResult:
    """Pretrain a CPM-Ant model per `cfg`; resumable; returns where the final model folder is and its numbers."""
    get_backend("train", cfg.backend)
    info = init_distributed()
    try:
        return _pretrain(cfg, callbacks, prepared, progress, info)
    finally:
        cleanup(info)


def _pretrain(cfg: PretrainConfig, callbacks, prepared, progress: bool, info: DistInfo) -> TrainResult:
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // info.world_size))
    if prepared is None:
        prepared = prepare_data(cfg.corpus, cfg.preset, cfg.vocab_size, cfg.valid_fraction, cfg.seed,
                                cfg.encode_workers, progress=progress and info.is_main)
    vocab_size = len(prepared.vocab_path.read_text(encoding="utf-8").splitlines())
    mcfg = build_model_config(cfg, vocab_size)
    if cfg.seq_len > mcfg.position_bias_max_distance:
        raise CpmantError(
            f"seq_len {cfg.seq_len} is longer than the position range of preset {cfg.preset!r} "
            f"(position_bias_max_distance={mcfg.position_bias_max_distance})",
            "lower seq_len or use a preset with a larger position_bias_max_distance",
        )
    common = dict(bos=6, eos=7, min_piece_tokens=cfg.min_piece_tokens, max_piece_tokens=cfg.max_piece_tokens,
                  lm_share=cfg.lm_share, mask_ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max))
    train_stream = PretrainStream(prepared.train_docs, mcfg, cfg.seq_len, seed=cfg.seed, **common)
    valid_stream = PretrainStream(prepared.valid_docs, mcfg, cfg.seq_len, seed=cfg.seed + 1, **common)

    run_dir = resolve_run_dir(cfg)
    ckpt_root = run_dir / "checkpoints"
    cfg_sha = config_sha256(cfg)
    if info.is_main:
        dump_config(cfg, run_dir / "config.yaml")
        mcfg.save(run_dir / "model_config.json")

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, info)
    model = CPMAnt(mcfg).to(device)  # initialised on the CPU from the seed: the same weights on any device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[cfg.schedule](cfg))

    # ---- resume --------------------------------------------------------------------------------------------
    start_step, valid_start, tokens_seen, data_position = 0, None, 0, 0
    resume_from = None
    if cfg.resume == "auto":
        resume_from = ckpt.latest_checkpoint(ckpt_root)
    elif cfg.resume != "never":
        resume_from = Path(cfg.resume)
        ckpt.read_meta(resume_from)  # raises a clear error when incomplete
    if resume_from is not None:
        saved_cfg, sd, _, meta = ckpt.load_model_dir(resume_from)
        if saved_cfg != mcfg:
            raise CpmantError(
                f"checkpoint {resume_from} was trained with another model config",
                "use --resume never (or a new output_dir) to start over, or restore the original config",
            )
        if meta.get("data_sha256") not in (None, prepared.data_sha256):
            raise CpmantError(f"checkpoint {resume_from} was trained on other data ({meta.get('data_sha256')})",
                              "resume with the same corpus, or use --resume never / a new output_dir")
        model.load_state_dict(sd)
        st = ckpt.load_training_state(resume_from)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"]["torch"])
        start_step, valid_start, tokens_seen = int(st["step"]), st.get("valid_loss_start"), int(st["tokens_seen"])
        data_position = int(st.get("data_position", 0))
        if start_step > cfg.max_steps:
            raise CpmantError(f"checkpoint {resume_from} is at step {start_step}, past max_steps={cfg.max_steps}",
                              f"raise max_steps to at least {start_step}, or resume from an earlier step folder")

    micro, accum, world = cfg.micro_batch_size, cfg.grad_accum, info.world_size
    rows_per_rank = micro * accum
    global_rows = rows_per_rank * world
    # data_position (rows consumed so far) lets a resumed run continue the stream where it stopped even if the
    # batch shape changed
    log = _JsonlLog(run_dir / "train_log.jsonl", start_step, info.is_main)
    peak = measure_matmul_peak(dtype=torch.bfloat16 if cfg.bf16 and device.type == "cuda" else torch.float32,
                               seconds=0.3, device=device.type)
    targets_run, tokens_run = 0.0, 0

    if valid_start is None:
        valid_start = evaluate(model, valid_stream, cfg.eval_rows, micro, cfg.bf16)["valid_loss"]
        if callbacks and info.is_main:
            callbacks.on_eval(0, {"valid_loss": valid_start, "valid_perplexity": math.exp(min(valid_start, 50))})

    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=f"pretrain {cfg.preset}", unit="step",
               disable=not (progress and info.is_main), dynamic_ncols=True, mininterval=0.5)
    train_seconds, loss_value, last_eval = 0.0, float("nan"), {"valid_loss": valid_start}
    t_run = time.perf_counter()
    step_tokens_window: list[tuple[int, float]] = []
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        first = data_position + (step - start_step) * global_rows + info.rank * rows_per_rank
        batches = [train_stream.batch(range(first + a * micro, first + (a + 1) * micro)) for a in range(accum)]
        counts = torch.tensor([float(sum(b.num_targets for b in batches)),
                               float(sum(int(b.length.sum()) for b in batches))])
        all_reduce_sum(counts, info)
        n_targets, n_tokens = counts[0].item(), int(counts[1].item())
        targets_run, tokens_run = targets_run + n_targets, tokens_run + n_tokens
        sums = torch.zeros(3)  # total, mask task, lm task
        counts_task = torch.zeros(2)
        for b in batches:
            s, per_task = _loss_sums(model, b, cfg.bf16)
            (s / n_targets).backward()
            sums += torch.stack([s.detach().cpu(), per_task[TASK_MASK], per_task[TASK_LM]])
            nt = (b.target != IGNORE).sum(-1)  # the CPU copy of the batch
            counts_task += torch.stack([nt[b.task == TASK_MASK].sum(), nt[b.task == TASK_LM].sum()]).float()
        all_reduce_grads(params, info)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        red = all_reduce_sum(torch.cat([sums, counts_task]), info)
        loss_value = red[0].item() / n_targets
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += n_tokens
        step_tokens_window.append((n_tokens, dt))
        tps = n_tokens / dt
        task_loss = {"mask": red[1].item() / max(red[3].item(), 1), "lm": red[2].item() / max(red[4].item(), 1)}
        metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tps,
                   "loss_mask": task_loss["mask"], "loss_lm": task_loss["lm"]}
        log.write({"iter": step + 1, "loss": loss_value, "lr": lr, "time": dt, "tokens_per_second": tps,
                   "grad_norm": grad_norm, "task_loss": task_loss})
        if callbacks and info.is_main:
            callbacks.on_step(step + 1, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        done = step + 1 == cfg.max_steps
        if (step + 1) % cfg.eval_interval == 0 or done:
            last_eval = evaluate(model, valid_stream, cfg.eval_rows, micro, cfg.bf16)
            if callbacks and info.is_main:
                callbacks.on_eval(step + 1, last_eval)
        if (step + 1) % cfg.save_interval == 0 or done:
            if info.is_main:
                path = ckpt.save_training_checkpoint(
                    ckpt_root, step + 1, model.state_dict(), mcfg, prepared.vocab_path,
                    training_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "rng": _rng_state(), "step": step + 1, "tokens_seen": tokens_seen,
                                    "data_position": data_position + (step + 1 - start_step) * global_rows,
                                    "valid_loss_start": valid_start},
                    meta={"data_sha256": prepared.data_sha256, "config_sha256": cfg_sha, "preset": cfg.preset},
                    keep_last=cfg.keep_last, keep_every=cfg.keep_every,
                )
                if callbacks:
                    callbacks.on_checkpoint(step + 1, path)
            barrier(info)
    bar.close()
    log.close()

    if start_step >= cfg.max_steps:  # already complete: the numbers come back from the checkpoint and the log
        last_eval = evaluate(model, valid_stream, cfg.eval_rows, micro, cfg.bf16)
        lines = (run_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
        if lines:
            loss_value = json.loads(lines[-1])["loss"]
    steady = step_tokens_window[1:] or step_tokens_window
    tps_avg = sum(n for n, _ in steady) / max(sum(t for _, t in steady), 1e-9)
    fpt = flops_per_token(mcfg, cfg.seq_len, vocab_share=targets_run / max(tokens_run, 1))
    mfu = fpt * tps_avg / world / peak if steady else 0.0

    model_dir = run_dir / "model"
    if info.is_main:
        final_meta = {"step": cfg.max_steps, "preset": cfg.preset, "data_sha256": prepared.data_sha256,
                      "config_sha256": cfg_sha, "valid_loss": last_eval["valid_loss"], "stage": "pretrain"}
        if ckpt.is_complete(model_dir):
            old = ckpt.read_meta(model_dir)
            if (old.get("step"), old.get("config_sha256"), old.get("data_sha256")) != (
                    cfg.max_steps, cfg_sha, prepared.data_sha256):
                import shutil

                shutil.rmtree(model_dir)
        if not ckpt.is_complete(model_dir):
            ckpt.save_model_dir(model_dir, model.state_dict(), mcfg, prepared.vocab_path, meta=final_meta,
                                extra_files={"training_config.yaml": run_dir / "config.yaml"})
    barrier(info)
    return TrainResult(
        run_dir=run_dir, model_dir=model_dir, model_config=mcfg.to_dict(), steps=cfg.max_steps,
        final_loss=loss_value, valid_loss_start=valid_start, valid_loss_end=last_eval["valid_loss"],
        tokens_seen=tokens_seen, tokens_per_second=tps_avg, train_seconds=train_seconds, mfu=mfu,
        peak_flops=peak, num_parameters=model.num_parameters(), resumed_from=start_step,
        data=prepared.summary(), config_sha256=cfg_sha,
    )
