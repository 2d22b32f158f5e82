"""The torch pretraining loop, in parts: setup, restore, step, evaluate, save, finalize (class `Pretraining`),
and `pretrain(cfg)`, the one call a test, a notebook, a Prefect task or torchrun makes.

Exactness across process counts: every micro-batch's summed token loss is divided by the number of targets in the
whole global batch (all ranks, all micro-batches), and gradients are summed over ranks, so N processes with
micro-batches of B rows compute the same update as one process accumulating N*B rows. Dropout draws the same masks
too: before each micro-batch's forward pass, the global generators are seeded from (seed, step, the global index
of the micro-batch's first row), which is also why a resumed run needs no saved random state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from ..backends import get_backend
from ..config import ModelConfig, get_preset
from ..configio import dump_config
from ..errors import CpmantError
from ..flops import flops_per_token, measure_matmul_peak
from ..heldout import HeldOutRows, heldout_loss, measured_docs
from ..lineage import HeldOutSpec
from ..fsutil import atomic_write_text
from ..model import CPMAnt
from ..precision import resolve_precision
from ..tokenizer import BOS_ID, EOS_ID
from .allocator import keep_freed_memory
from .config import PretrainConfig
from .data import IGNORE, TASK_LM, TASK_MASK, PretrainStream
from .distributed import (DistInfo, all_reduce_grads, all_reduce_sum, barrier, cleanup, init_distributed,
                          pick_device)
from .evaluate import evaluate, loss_sums
from .prepare import PreparedData, prepare_data
from .runs import (RunLock, changed_settings, config_sha256, read_saved_config, resolve_run_dir, run_key,
                   unfinished_runs)
from .schedule import SCHEDULES
from .state import check_files, restore_state, save_state, seed_everything, set_aside

__all__ = ["Callbacks", "Pretraining", "TrainResult", "build_model_config", "config_sha256", "evaluate",
           "pretrain", "resolve_run_dir"]


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
    precision: str = "fp32"  # the precision the run used (resolved: fp32 or bf16)
    precision_setting: str = "fp32"  # the configured setting (auto, fp32, bf16)
    skipped_checkpoints: list = field(default_factory=list)  # "step folder: reason" of damaged ones passed over
    heldout_sha256: str = ""  # the identity of the rows valid_loss_* are measured on (cpmant/heldout.py)

    def to_json(self) -> dict:
        d = asdict(self)
        d["run_dir"], d["model_dir"] = str(self.run_dir), str(self.model_dir)
        return d


def build_model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    base = get_preset(cfg.preset)
    try:
        return base.replace(**{**cfg.model_overrides, "vocab_size": vocab_size})
    except TypeError as e:
        raise CpmantError(f"model_overrides: {e}", f"use ModelConfig fields: {sorted(base.to_dict())}") from e


def heldout_rows(cfg: PretrainConfig, data: PreparedData) -> HeldOutRows:
    """The held-out rows of a run (cpmant/heldout.py): the measured half of its held-out split, its spec."""
    if not data.valid_docs:
        raise CpmantError(f"the validation split of corpus {data.corpus_name!r} is empty "
                          f"({len(data.train_docs)} training documents)",
                          "add documents to the corpus, or raise valid_fraction")
    return HeldOutRows(measured_docs(data.valid_docs), HeldOutSpec.of_pretraining(cfg), cfg.seed,
                       cfg.min_piece_tokens, cfg.max_piece_tokens, data.data_sha256, data.vocab_sha256)


def build_streams(cfg: PretrainConfig, mcfg: ModelConfig, data: PreparedData,
                  rows: HeldOutRows | None = None) -> tuple[PretrainStream, PretrainStream]:
    """The training stream of a run and its held-out stream (the rows of cpmant.heldout's measure)."""
    rows = rows or heldout_rows(cfg, data)
    common = dict(bos=BOS_ID, eos=EOS_ID, min_piece_tokens=cfg.min_piece_tokens,
                  max_piece_tokens=cfg.max_piece_tokens, lm_share=cfg.lm_share,
                  mask_ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max))
    return (PretrainStream(data.train_docs, mcfg, cfg.seq_len, seed=cfg.seed, split="training split", **common),
            rows.stream(mcfg))


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "position_bias" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.enabled:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.enabled:
            self.f.close()


def _refusal(what: str, diff: list[str], step_folder: Path) -> CpmantError:
    return CpmantError(
        f"{what} was trained with other settings ({'; '.join(diff)})",
        f"start this configuration fresh in its own run folder with --resume never, or continue those weights "
        f"under the new settings with --resume {step_folder} --set pretrain.allow_changed_settings=true",
    )


class Pretraining:
    """One pretraining run in parts. `__init__` is the setup (threads, allocator, data, streams, model, optimizer;
    nothing written yet); then, holding the run folder's lock: `restore()`, `step(step)` per optimizer step,
    `evaluate()`, `save(step)`, and `finalize()`, which writes the final model folder and returns the result."""

    def __init__(self, cfg: PretrainConfig, info: DistInfo | None = None, callbacks: Callbacks | None = None,
                 prepared: PreparedData | None = None, progress: bool = True):
        self.cfg, self.info = cfg, info or DistInfo()
        self.callbacks = callbacks if self.info.is_main else None
        self.progress = progress and self.info.is_main
        keep_freed_memory()
        torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // self.info.world_size))
        if prepared is None:
            prepared = prepare_data(cfg.corpus, cfg.preset, cfg.vocab_size, cfg.valid_fraction, cfg.seed,
                                    cfg.encode_workers, progress=self.progress)
        self.data = prepared
        vocab_size = len(prepared.vocab_path.read_text(encoding="utf-8").splitlines())
        self.mcfg = mcfg = build_model_config(cfg, vocab_size)
        if cfg.seq_len > mcfg.position_bias_max_distance:
            raise CpmantError(
                f"seq_len {cfg.seq_len} is longer than the position range of preset {cfg.preset!r} "
                f"(position_bias_max_distance={mcfg.position_bias_max_distance})",
                "lower seq_len or use a preset with a larger position_bias_max_distance",
            )
        self.heldout = heldout_rows(cfg, prepared)
        self.train_stream, self.valid_stream = build_streams(cfg, mcfg, prepared, self.heldout)
        self.run_dir = resolve_run_dir(cfg)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.cfg_sha = config_sha256(cfg)

        torch.manual_seed(cfg.seed)
        self.device = pick_device(cfg.device, self.info)
        self.precision = resolve_precision(cfg.precision, self.device)  # once per run, on the device used
        self.model = CPMAnt(mcfg).to(self.device)  # initialised on the CPU from the seed: the same on any device
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(0.9, 0.95), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, SCHEDULES[cfg.schedule](cfg))

        self.micro, self.accum = cfg.micro_batch_size, cfg.grad_accum
        self.rows_per_rank = self.micro * self.accum
        self.global_rows = self.rows_per_rank * self.info.world_size
        self.start_step, self.valid_start, self.tokens_seen, self.data_position = 0, None, 0, 0
        self.skipped: list[str] = []
        self.targets_run, self.tokens_run = 0.0, 0
        self.train_seconds, self.loss_value = 0.0, float("nan")
        self.last_eval: dict = {}
        self.step_times: list[tuple[int, float]] = []
        self._lock = RunLock(self.run_dir) if self.info.is_main else None

    # ---- the run folder's lock ----------------------------------------------------------------------------
    def __enter__(self) -> "Pretraining":
        if self._lock is not None:
            self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()

    # ---- restore --------------------------------------------------------------------------------------------
    def resume_point(self) -> Path | None:
        """The step folder to continue (None: start from step 0); refuses one trained with other settings."""
        cfg = self.cfg
        if cfg.resume == "never":
            return None
        if cfg.resume == "auto":
            path, skipped = ckpt.latest_intact_checkpoint(self.ckpt_root)
            self._damaged = [p for p, _ in skipped]
            self.skipped = [f"{p}: {why}" for p, why in skipped]
            if path is None and not cfg.output_dir:
                others = unfinished_runs(cfg, self.run_dir, self.data.data_sha256)
                if others:
                    other, step, saved = others[0]
                    diff = changed_settings(saved, cfg)
                    step_folder = other / "checkpoints" / ckpt.step_dir_name(step)
                    raise _refusal(f"this configuration's run folder {self.run_dir} has no checkpoint, and the "
                                   f"unfinished run in {other} (step {step} of {saved.get('max_steps')}, same "
                                   f"data)", diff, step_folder)
            if path is None:
                return None
        else:
            path = Path(cfg.resume).expanduser()
            if not path.is_dir():
                raise CpmantError(f"checkpoint folder {path} does not exist",
                                  "pass a step folder (runs/.../checkpoints/step-N), auto or never")
            why = check_files(path)
            if why is not None:
                raise CpmantError(f"checkpoint {path} cannot be resumed: {why}",
                                  "resume from another step folder, or use --resume auto to continue the newest "
                                  "intact checkpoint of this run")
        meta = ckpt.read_meta(path)
        saved = meta.get("training_config") or read_saved_config(path.parent.parent)
        diff = changed_settings(saved, cfg) if saved else []
        self.changed = diff
        if diff and not cfg.allow_changed_settings:
            raise _refusal(f"checkpoint {path}", diff, path)
        if meta.get("data_sha256") not in (None, self.data.data_sha256):
            raise CpmantError(f"checkpoint {path} was trained on other data ({meta.get('data_sha256')})",
                              "resume with the same corpus, or use --resume never / a new output_dir")
        return path

    def restore(self) -> int:
        """Continue from the resume point: weights, optimizer, scheduler, counters. Returns the start step."""
        self._damaged, self.changed = [], []
        path = self.resume_point()
        barrier(self.info)  # every rank has read the folder before the main one moves damaged steps aside
        if self.info.is_main:
            for p in self._damaged:
                set_aside(p)
        for line in self.skipped:
            warnings.warn(f"resume skipped a damaged checkpoint (moved aside as damaged-step-N): {line}",
                          stacklevel=2)
        if path is None:
            return 0
        try:
            saved_cfg = ModelConfig.load(path / ckpt.CONFIG_FILE)
        except (OSError, ValueError, CpmantError) as e:
            raise CpmantError(f"checkpoint {path} has no readable model config ({e})",
                              "resume from another step folder, or --resume never") from None
        if saved_cfg != self.mcfg:
            raise CpmantError(
                f"checkpoint {path} was trained with another model config",
                "use --resume never (or a new output_dir) to start over, or restore the original config",
            )
        st = restore_state(path, self.model, self.optimizer, self.scheduler, restore_rng=False)
        if self.changed:
            self._apply_new_settings()
        self.start_step = int(st["step"])
        self.valid_start, self.tokens_seen = st.get("valid_loss_start"), int(st.get("tokens_seen", 0))
        self.data_position = int(st.get("data_position", 0))
        if self.start_step > self.cfg.max_steps:
            raise CpmantError(
                f"checkpoint {path} is at step {self.start_step}, past max_steps={self.cfg.max_steps}",
                f"raise max_steps to at least {self.start_step}, or resume from an earlier step folder")
        return self.start_step

    def _apply_new_settings(self) -> None:
        """allow_changed_settings: the optimizer and schedule take the new lr, weight decay and schedule."""
        cfg, sched = self.cfg, self.scheduler
        sched.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        new = SCHEDULES[cfg.schedule](cfg)
        sched.lr_lambdas = [new for _ in self.optimizer.param_groups]
        for g, wd in zip(self.optimizer.param_groups, (cfg.weight_decay, 0.0)):
            g["initial_lr"], g["weight_decay"] = cfg.lr, wd
            g["lr"] = cfg.lr * new(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        warnings.warn(f"resuming with changed settings ({'; '.join(self.changed)}): the optimizer's lr, weight "
                      f"decay and schedule now come from the new config (lr {self.optimizer.param_groups[0]['lr']:.3g}"
                      f" at step {sched.last_epoch})", stacklevel=2)

    # ---- one optimizer step ---------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        cfg, info, micro = self.cfg, self.info, self.micro
        t0 = time.perf_counter()
        first = self.data_position + (step - self.start_step) * self.global_rows + info.rank * self.rows_per_rank
        starts = [first + a * micro for a in range(self.accum)]  # global index of each micro-batch's first row
        batches = [self.train_stream.batch(range(s, s + micro)) for s in starts]
        counts = torch.tensor([float(sum(b.num_targets for b in batches)),
                               float(sum(int(b.length.sum()) for b in batches))])
        all_reduce_sum(counts, info)
        n_targets, n_tokens = counts[0].item(), int(counts[1].item())
        self.targets_run, self.tokens_run = self.targets_run + n_targets, self.tokens_run + n_tokens
        sums = torch.zeros(3)  # total, mask task, lm task
        counts_task = torch.zeros(2)
        for s, b in zip(starts, batches):
            seed_everything(cfg.seed, step, s)  # dropout masks: a function of the rows, not of the process
            total, per_task = loss_sums(self.model, b, self.precision)
            (total / n_targets).backward()
            sums += torch.stack([total.detach().cpu(), per_task[TASK_MASK], per_task[TASK_LM]])
            has = b.target != IGNORE  # the CPU copy of the batch
            counts_task += torch.stack([(has & (b.task == TASK_MASK)).sum(), (has & (b.task == TASK_LM)).sum()])
        all_reduce_grads(self.params, info)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        red = all_reduce_sum(torch.cat([sums, counts_task]), info)
        self.loss_value = red[0].item() / n_targets
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        self.tokens_seen += n_tokens
        self.step_times.append((n_tokens, dt))
        task_loss = {"mask": red[1].item() / max(red[3].item(), 1), "lm": red[2].item() / max(red[4].item(), 1)}
        return {"loss": self.loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": n_tokens / dt,
                "loss_mask": task_loss["mask"], "loss_lm": task_loss["lm"], "time": dt}

    # ---- evaluate, save -------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The held-out measure (cpmant.heldout.heldout_loss: fp32, the measured half of the held-out split), the
        same rows at every evaluation, logged as valid_loss / valid_perplexity."""
        ev = heldout_loss(self.model, self.heldout)
        return {"valid_loss": ev["lm_loss"], "valid_perplexity": ev["perplexity"], "valid_tokens": ev["tokens"]}

    def meta(self) -> dict:
        return {"data_sha256": self.data.data_sha256, "config_sha256": self.cfg_sha, "run_key": run_key(self.cfg),
                "preset": self.cfg.preset, "training_config": self.cfg.model_dump(mode="json")}

    def save(self, step: int) -> Path | None:
        """Save step-N (main process), then wait for every process."""
        path = None
        if self.info.is_main:
            cfg = self.cfg
            path = save_state(
                self.ckpt_root, step, self.model, self.mcfg, self.data.vocab_path, self.optimizer, self.scheduler,
                extra={"tokens_seen": self.tokens_seen, "valid_loss_start": self.valid_start,
                       "data_position": self.data_position + (step - self.start_step) * self.global_rows},
                meta=self.meta(), keep_last=cfg.keep_last, keep_every=cfg.keep_every)
            if self.callbacks:
                self.callbacks.on_checkpoint(step, path)
        barrier(self.info)
        return path

    # ---- the whole run --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        self.restore()
        if info.is_main:
            dump_config(cfg, self.run_dir / "config.yaml")
            self.mcfg.save(self.run_dir / "model_config.json")
        log = _JsonlLog(self.run_dir / "train_log.jsonl", self.start_step, info.is_main)
        # MFU against the peak of the dtype the matrix products run in (bf16 under bf16 autocast, on any device)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.peak = measure_matmul_peak(dtype=dtype, seconds=0.3, device=self.device.type)
        if self.valid_start is None:
            self.valid_start = self.evaluate()["valid_loss"]
            if self.callbacks:
                self.callbacks.on_eval(0, {"valid_loss": self.valid_start,
                                           "valid_perplexity": math.exp(min(self.valid_start, 50))})
        self.last_eval = {"valid_loss": self.valid_start}
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc=f"pretrain {cfg.preset} {self.precision}",
                   unit="step", disable=not self.progress, dynamic_ncols=True, mininterval=0.5)
        try:
            for step in range(self.start_step, cfg.max_steps):
                m = self.step(step)
                dt = m.pop("time")
                log.write({"iter": step + 1, "loss": m["loss"], "lr": m["lr"], "time": dt,
                           "tokens_per_second": m["tokens_per_second"], "grad_norm": m["grad_norm"],
                           "task_loss": {"mask": m["loss_mask"], "lm": m["loss_lm"]}})
                if self.callbacks:
                    self.callbacks.on_step(step + 1, m)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_second']:,.0f}", refresh=False)
                done = step + 1 == cfg.max_steps
                if (step + 1) % cfg.eval_interval == 0 or done:
                    self.last_eval = self.evaluate()
                    if self.callbacks:
                        self.callbacks.on_eval(step + 1, self.last_eval)
                if (step + 1) % cfg.save_interval == 0 or done:
                    self.save(step + 1)
        finally:
            bar.close()
            log.close()
        return self.finalize()

    def finalize(self) -> TrainResult:
        """The final model folder (with the data spec in its metadata) and the run's numbers."""
        cfg, info = self.cfg, self.info
        if self.start_step >= cfg.max_steps:  # already complete: the numbers come from the checkpoint and log
            self.last_eval = self.evaluate()
            lines = (self.run_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
            if lines:
                self.loss_value = json.loads(lines[-1])["loss"]
        steady = self.step_times[1:] or self.step_times
        tps = sum(n for n, _ in steady) / max(sum(t for _, t in steady), 1e-9)
        fpt = flops_per_token(self.mcfg, cfg.seq_len, vocab_share=self.targets_run / max(self.tokens_run, 1))
        mfu = fpt * tps / info.world_size / self.peak if steady else 0.0
        model_dir = self.run_dir / "model"
        if info.is_main:
            final_meta = {**self.meta(), "step": cfg.max_steps, "valid_loss": self.last_eval["valid_loss"],
                          "stage": "pretrain",
                          "data": {**self.data.spec(cfg.min_piece_tokens, cfg.max_piece_tokens),
                                   "heldout": self.heldout.spec.to_meta()}}
            if ckpt.is_complete(model_dir):
                old = ckpt.read_meta(model_dir)
                if (old.get("step"), old.get("config_sha256"), old.get("data_sha256")) != (
                        cfg.max_steps, self.cfg_sha, self.data.data_sha256):
                    shutil.rmtree(model_dir)
            if not ckpt.is_complete(model_dir):
                ckpt.save_model_dir(model_dir, self.model.state_dict(), self.mcfg, self.data.vocab_path,
                                    meta=final_meta, extra_files={"training_config.yaml": self.run_dir / "config.yaml"})
        barrier(info)
        return TrainResult(
            run_dir=self.run_dir, model_dir=model_dir, model_config=self.mcfg.to_dict(), steps=cfg.max_steps,
            final_loss=self.loss_value, valid_loss_start=self.valid_start,
            valid_loss_end=self.last_eval["valid_loss"], tokens_seen=self.tokens_seen, tokens_per_second=tps,
            train_seconds=self.train_seconds, mfu=mfu, peak_flops=self.peak,
            num_parameters=self.model.num_parameters(), resumed_from=self.start_step, data=self.data.summary(),
            config_sha256=self.cfg_sha, precision=self.precision, precision_setting=cfg.precision,
            skipped_checkpoints=list(self.skipped), heldout_sha256=self.heldout.sha256,
        )


def pretrain(cfg: PretrainConfig, callbacks: Callbacks | None = None, prepared: PreparedData | None = None,
             progress: bool = True) -> TrainResult:
    """Pretrain a CPM-Ant model per `cfg`; resumable; returns where the final model folder is and its numbers."""
    get_backend("train", cfg.backend)
    info = init_distributed()
    try:
        run = Pretraining(cfg, info, callbacks, prepared, progress)
        with run:
            return run.run()
    finally:
        cleanup(info)
