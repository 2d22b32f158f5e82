"""The validation suite of one model: held-out perplexity, smoke generations, tokens/s, first-token latency, peak
memory and (for a task delta) the task's metrics. Plain PyTorch: the same call runs in a test, a notebook and the
validate flow.

    report = run_suite(load, data_dir, ValidateConfig(), stage="compress")
    report["metrics"]   # perplexity, lm_loss, tokens_per_second, first_token_ms_p50/p95, peak_memory_mb, ...

What each number is:
- `perplexity` / `lm_loss`: left-to-right LM loss (cpmant.training.evaluate) on the first `eval_rows` rows of the
  held-out split the model's data lineage names (cpmant.lineage: the corpus, split and vocab it was trained with),
  rows of `seq_len` tokens. Every version of one lineage is measured on the same rows, so the numbers compare.
- smoke generations: one batched call over `prompts` with GenerationConfig's defaults (plus `generation`) and
  `max_new_tokens`; each checked by cpmant.validation.checks (non-empty, valid UTF-8, no `<unk>`, no loop).
- `tokens_per_second`: generated ids per second of `speed_repeats` timed batched calls (all prompts in one batch),
  after the smoke call (which warms up).
- `first_token_ms_p50/p95`: per prompt, alone, `latency_repeats` times: the wall time until the first token
  (cpmant.generate.generate_stream's first item where it exists, else generate_ids with max_new_tokens=1: the
  prefill plus one sampling step, the same work), after one untimed call per prompt.
- `peak_memory_mb`: cpmant.memory.PeakMemory over loading the model and every measure above (resident set above the
  baseline before loading, taken after the held-out data is read and jieba's dictionary is loaded;
  `cuda_peak_memory_mb` on CUDA). The process's other threads count too (a task runner running two validations
  at once measures both).
- a delta's task: cpmant.cuge `get_task(name).evaluate(...)` on the test split (at most `task_examples`): each
  metric as `eval_<metric>`, the task's primary metric also as `task_score`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import CpmantError
from .checks import percentile, smoke_check, smoke_summary
from .config import ValidateConfig

_DATA_CACHE: dict[tuple, object] = {}  # (data sha256, vocab path, vocab mtime) -> encoded held-out documents


def model_kind(stage: str, config) -> str:
    """base | size variant | int8 | MoE | delta: what the report calls the model."""
    if stage == "delta":
        return "delta"
    if getattr(config, "quantization", None):
        return str(config.quantization)
    if getattr(config, "moe_experts", None):
        return "MoE"
    return "size variant" if stage == "compress" else "base"


def held_out_docs(data_dir: str | Path, progress: bool = False):
    """(lineage, held-out documents encoded with the folder's vocab) of the data `data_dir` was trained with; kept
    in memory for the next model of the same lineage."""
    from ..checkpoint import VOCAB_FILE
    from ..lineage import load_lineage_data, read_lineage

    data_dir = Path(data_dir)
    lin = read_lineage(data_dir)
    vocab = data_dir / VOCAB_FILE
    key = (lin.data_sha256, str(vocab.resolve()), vocab.stat().st_mtime_ns if vocab.exists() else 0)
    if key not in _DATA_CACHE:
        d = load_lineage_data(data_dir, progress=progress)
        if not d.valid:
            raise CpmantError(f"the held-out split {data_dir} was trained with is empty",
                              "pretrain with a larger pretrain.valid_fraction or a larger corpus")
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = (lin, d.valid)
    return _DATA_CACHE[key]


def measure_perplexity(model, data_dir: str | Path, cfg: ValidateConfig, progress: bool = False) -> dict:
    from ..tokenizer import BOS_ID, EOS_ID
    from ..training.data import PretrainStream
    from ..training.evaluate import evaluate

    lin, valid = held_out_docs(data_dir, progress)
    mc = model.config
    seq_len = min(cfg.seq_len, mc.position_bias_max_distance)
    stream = PretrainStream(valid, mc, seq_len, bos=BOS_ID, eos=EOS_ID, min_piece_tokens=lin.min_piece_tokens,
                            max_piece_tokens=lin.max_piece_tokens, seed=lin.seed, split="held-out split")
    ev = evaluate(model, stream, cfg.eval_rows, cfg.batch_size, "fp32")
    return {"lm_loss": ev["valid_loss"], "perplexity": ev["valid_perplexity"], "eval_tokens": ev["valid_tokens"]}


def _gen_config(cfg: ValidateConfig, **over):
    from ..generation_config import GenerationConfig

    return GenerationConfig.from_params({**cfg.generation, "max_new_tokens": cfg.max_new_tokens, **over})


@torch.no_grad()
def measure_generation(model, tokenizer, cfg: ValidateConfig) -> tuple[dict, list[dict]]:
    """Smoke checks and tokens/s: (metrics, one dict per prompt with its text and checks)."""
    from ..generate import generate_ids
    from ..tokenizer import UNK_ID

    gen = _gen_config(cfg)
    prompts = list(cfg.prompts)
    ids = generate_ids(model, tokenizer, prompts, gen)  # also the warm-up of the timed calls
    results = [smoke_check(p, x, tokenizer.decode(x), UNK_ID, cfg.loop_ngram, cfg.loop_repeats)
               for p, x in zip(prompts, ids)]
    n, t0 = 0, time.perf_counter()
    for _ in range(cfg.speed_repeats):
        n += sum(len(x) for x in generate_ids(model, tokenizer, prompts, gen))
    dt = time.perf_counter() - t0
    metrics = {**smoke_summary(results), "tokens_per_second": n / max(dt, 1e-9), "generated_tokens": float(n)}
    return metrics, [r.to_dict() for r in results]


def _first_token_seconds(model, tokenizer, prompt: str, cfg: ValidateConfig) -> float:
    from .. import generate as g

    stream = getattr(g, "generate_stream", None)
    t0 = time.perf_counter()
    if stream is not None:
        it = stream(model, tokenizer, prompt, _gen_config(cfg))
        try:
            next(it, None)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
    else:
        g.generate_ids(model, tokenizer, [prompt], _gen_config(cfg, max_new_tokens=1))
    return time.perf_counter() - t0


@torch.no_grad()
def measure_latency(model, tokenizer, cfg: ValidateConfig) -> dict:
    """First-token latency in ms, p50 and p95 over every prompt x latency_repeats, after one untimed call per
    prompt (a first call of a new input length pays one-off set-up costs)."""
    for p in cfg.prompts:
        _first_token_seconds(model, tokenizer, p, cfg)
    times = [1000.0 * _first_token_seconds(model, tokenizer, p, cfg)
             for _ in range(cfg.latency_repeats) for p in cfg.prompts]
    return {"first_token_ms_p50": percentile(times, 50), "first_token_ms_p95": percentile(times, 95)}


def load_task(task_name: str, cfg: ValidateConfig, data_dir: str | None = None):
    """(task, test examples: at most cfg.task_examples) of a delta's task; its data folder is cfg.task_data, else
    `data_dir`, else the task's default ($CUGE_DATA/<task>; demo tasks: the default corpus)."""
    try:
        from ..cuge import get_task
    except ImportError as e:
        raise CpmantError(f"cannot evaluate task {task_name!r}: cpmant.cuge has no get_task ({e})",
                          "update cpmant (delta tuning's CUGE tasks)") from None
    task = get_task(task_name)
    examples = list(task.load("test", data_dir=cfg.task_data or data_dir))
    if cfg.task_examples is not None:
        examples = examples[: cfg.task_examples]
    return task, examples


def measure_task(model, tokenizer, task, examples: list, cfg: ValidateConfig) -> dict:
    """A delta's task on its test examples: {"name", "primary_metric", "examples", "metrics": {...}}."""
    res = task.evaluate(model, tokenizer, examples, cfg.batch_size)
    metrics = {k: float(v) for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"name": task.name, "primary_metric": task.primary_metric, "examples": len(examples), "metrics": metrics}


def _warm_up(cfg: ValidateConfig) -> None:
    """One-off costs of a fresh process that are not the model's: imports, jieba's dictionary, torch's thread pool
    and kernel set-up (a few matrix products through the kinds of op a forward pass runs)."""
    import torch.nn.functional as F

    from .. import generate  # noqa: F401
    from ..tokenizer import jieba_cut

    jieba_cut(cfg.prompts[0])
    with torch.no_grad():
        x = torch.randn(4, 64, 256)
        w = torch.randn(256, 256)
        y = F.softmax(F.layer_norm(x @ w, (256,)), dim=-1) @ w.T
        F.cross_entropy(y.reshape(-1, 256), torch.zeros(4 * 64, dtype=torch.long))
        F.embedding(torch.zeros(4, 8, dtype=torch.long), w)


def run_suite(load: Callable[[], tuple], data_dir: str | Path, cfg: ValidateConfig | None = None, *,
              stage: str = "pretrain", task: str | None = None, task_data: str | None = None,
              progress: bool = False) -> dict:
    """Load (with `load()` -> (model, tokenizer)) and measure one model; the report dict:
    {"kind", "metrics", "samples", "task", "model_config", "seconds", "settings"}. `data_dir` is the checkpoint
    folder whose data lineage gives the held-out split (a delta's base folder for a delta); `task` and
    `task_data`: a delta's task and its data folder (cfg.task_data wins)."""
    from ..memory import PeakMemory

    cfg = cfg or ValidateConfig()
    held_out_docs(data_dir, progress)  # data first: its memory is not the model's
    task_data_ = load_task(task, cfg, task_data) if task else None  # nor the task's examples
    _warm_up(cfg)  # nor jieba's dictionary, loaded at the first tokenization
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    with PeakMemory() as pm:
        model, tokenizer = load()
        seconds["load"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics = measure_perplexity(model, data_dir, cfg, progress)
        seconds["perplexity"] = time.perf_counter() - t
        t = time.perf_counter()
        gen_metrics, samples = measure_generation(model, tokenizer, cfg)
        metrics.update(gen_metrics)
        seconds["generation"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics.update(measure_latency(model, tokenizer, cfg))
        seconds["latency"] = time.perf_counter() - t
        task_report = None
        if task:
            t = time.perf_counter()
            task_report = measure_task(model, tokenizer, *task_data_, cfg)
            seconds["task"] = time.perf_counter() - t
            metrics.update({f"eval_{k}": v for k, v in task_report["metrics"].items()})
            primary = task_report["metrics"].get(task_report["primary_metric"])
            if primary is not None:
                metrics["task_score"] = primary
    metrics["peak_memory_mb"] = pm.peak_mb
    if pm.cuda_peak_mb is not None:
        metrics["cuda_peak_memory_mb"] = pm.cuda_peak_mb
    mc = model.config
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return {"kind": model_kind(stage, mc), "stage": stage, "metrics": metrics, "samples": samples,
            "task": task_report, "seconds": seconds, "settings": cfg.measurement(),
            "model_config": {k: getattr(mc, k) for k in ("vocab_size", "dim_model", "num_layers", "num_heads",
                                                         "dim_ff", "quantization", "moe_experts", "moe_top_k")
                             if hasattr(mc, k)}}
