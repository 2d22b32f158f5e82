"""The validation suite of one model: held-out perplexity, smoke generations, tokens/s, first-token latency, peak
memory and (for a task delta) the task's metrics. Plain PyTorch: the same call runs in a test, a notebook and the
validate flow.

    report = run_suite(load, data_dir, ValidateConfig(), stage="compress")
    report["metrics"]   # perplexity, lm_loss, tokens_per_second, first_token_ms_p50/p95, peak_memory_mb, ...

What each number is:
- `perplexity` / `lm_loss`: the one held-out measure (cpmant.heldout.heldout_loss, fp32): the measured half of the
  held-out split the model's data lineage names (cpmant.lineage: the corpus, split and vocab it was trained with),
  with the rows, row length and batch its pretraining recorded; the same number as pretraining's `valid_loss_end`
  and the ladder's `lm_loss`. `heldout_sha256` (a string beside the metrics, not logged as a metric) names those
  rows: a perplexity gate compares only measurements with the same one.
- smoke generations: one batched call over `prompts` with GenerationConfig's defaults (plus `generation`) and
  `max_new_tokens`; each checked by cpmant.validation.checks (non-empty, valid UTF-8, no `<unk>`, no loop).
- `tokens_per_second`: generated ids per second of `speed_repeats` timed batched calls (all prompts in one batch);
  `first_token_ms_p50/p95`: per prompt, alone, `latency_repeats` times: the wall time until the first token
  (cpmant.generate.generate_stream's first item where it exists, else generate_ids with max_new_tokens=1: the
  prefill plus one sampling step, the same work). Both after an untimed batched call and one untimed first token
  per prompt. With a champion (`champion_load`), the champion is timed beside the candidate, in alternation
  (`measure_timings`), and logged as `champion_<metric>`: the timing gates compare these two, never a figure
  recorded under another load.
- `peak_memory_mb`: cpmant.memory.PeakMemory over loading the model, perplexity, the smoke generations and the
  task's predictions (resident set above the baseline before loading, taken after the held-out data is read and
  jieba's dictionary is loaded; `cuda_peak_memory_mb` on CUDA). The timings and the references (champion, base)
  come after it: it is the candidate's alone. The process's other threads count too (a task runner running two
  validations at once measures both).
- a delta's task: cpmant.cuge `get_task(name)`'s predictions on the test split (at most `task_examples`): each
  metric as `eval_<metric>`; the primary metric as `task_score` with its 95% bootstrap interval; on the same
  examples, its base scored zero-shot (`predict(..., zero_shot=True)`) and the champion: the paired differences
  `task_vs_zero_shot`, `task_vs_champion` with `_ci_low` / `_ci_high` (`task_comparison`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import CpmantError
from ..hashing import sha256_text
from .checks import percentile, smoke_check, smoke_summary
from .config import TIMED_METRICS, ValidateConfig

_DATA_CACHE: dict[tuple, object] = {}  # (data sha256, spec, vocab path, vocab mtime) -> cpmant.heldout.HeldOutRows


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
    """The held-out rows (cpmant.heldout.HeldOutRows) of the data `data_dir` was trained with; kept in memory for
    the next model of the same lineage."""
    from ..checkpoint import VOCAB_FILE
    from ..heldout import HeldOutRows
    from ..lineage import load_lineage_data, read_lineage

    data_dir = Path(data_dir)
    lin = read_lineage(data_dir)
    vocab = data_dir / VOCAB_FILE
    key = (lin.data_sha256, lin.heldout, str(vocab.resolve()), vocab.stat().st_mtime_ns if vocab.exists() else 0)
    if key not in _DATA_CACHE:
        d = load_lineage_data(data_dir, progress=progress)
        if not d.valid:
            raise CpmantError(f"the held-out split {data_dir} was trained with is empty",
                              "pretrain with a larger pretrain.valid_fraction or a larger corpus")
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = HeldOutRows.from_lineage_data(d)
    return _DATA_CACHE[key]


def measure_perplexity(model, data_dir: str | Path, cfg: ValidateConfig | None = None,
                       progress: bool = False) -> dict:
    """The held-out measure (cpmant.heldout) of `model` on `data_dir`'s lineage: {"lm_loss", "perplexity",
    "eval_tokens", "heldout_sha256"}. `cfg` is not read (the rows are the lineage's); kept for callers."""
    from ..heldout import heldout_loss

    rows = held_out_docs(data_dir, progress)
    ev = heldout_loss(model, rows)
    return {"lm_loss": ev["lm_loss"], "perplexity": ev["perplexity"], "eval_tokens": ev["tokens"],
            "heldout_sha256": rows.sha256}


def _gen_config(cfg: ValidateConfig, **over):
    from ..generation_config import GenerationConfig

    return GenerationConfig.from_params({**cfg.generation, "max_new_tokens": cfg.max_new_tokens, **over})


@torch.no_grad()
def measure_generation(model, tokenizer, cfg: ValidateConfig) -> tuple[dict, list[dict]]:
    """Smoke checks: (metrics, one dict per prompt with its text and checks)."""
    from ..generate import generate_ids
    from ..tokenizer import UNK_ID

    prompts = list(cfg.prompts)
    ids = generate_ids(model, tokenizer, prompts, _gen_config(cfg))
    results = [smoke_check(p, x, tokenizer.decode(x), UNK_ID, cfg.loop_ngram, cfg.loop_repeats)
               for p, x in zip(prompts, ids)]
    return smoke_summary(results), [r.to_dict() for r in results]


def _timed_batch(model, tokenizer, cfg: ValidateConfig) -> tuple[int, float]:
    """One batched generation of every prompt: (generated ids, seconds)."""
    from ..generate import generate_ids

    t0 = time.perf_counter()
    n = sum(len(x) for x in generate_ids(model, tokenizer, list(cfg.prompts), _gen_config(cfg)))
    return n, time.perf_counter() - t0


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
def measure_timings(models: dict[str, tuple], cfg: ValidateConfig, timed_batch: Callable = _timed_batch,
                    first_token: Callable = _first_token_seconds) -> dict[str, dict]:
    """tokens/s and first-token latency of one or more models (label -> (model, tokenizer); the candidate and the
    champion), timed in alternation so that every model runs under the same load: after an untimed batched
    generation and one untimed first token per prompt each (one-off set-up costs), `speed_repeats` rounds of one
    batched generation per model in turn (candidate, champion, candidate, champion, ...), then `latency_repeats`
    rounds over the prompts, each prompt's first token timed for every model in turn. Per label: tokens_per_second
    (ids over seconds, summed over rounds), first_token_ms_p50/p95 (over prompts x rounds), generated_tokens.
    `timed_batch(model, tok, cfg) -> (ids, seconds)` and `first_token(model, tok, prompt, cfg) -> seconds` time one
    generation (the defaults generate; a test gives its own clock)."""
    with torch.no_grad():
        for model, tok in models.values():
            timed_batch(model, tok, cfg)
            for p in cfg.prompts:
                first_token(model, tok, p, cfg)
        ids = {k: 0 for k in models}
        secs = {k: 0.0 for k in models}
        for _ in range(cfg.speed_repeats):
            for k, (model, tok) in models.items():
                n, dt = timed_batch(model, tok, cfg)
                ids[k] += n
                secs[k] += dt
        ms: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(cfg.latency_repeats):
            for p in cfg.prompts:
                for k, (model, tok) in models.items():
                    ms[k].append(1000.0 * first_token(model, tok, p, cfg))
    return {k: {"tokens_per_second": ids[k] / max(secs[k], 1e-9), "generated_tokens": float(ids[k]),
                "first_token_ms_p50": percentile(ms[k], 50), "first_token_ms_p95": percentile(ms[k], 95)}
            for k in models}


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
    """A delta's task on its test examples: {"name", "primary_metric", "examples", "metrics": {...},
    "predictions": [...]} (the predictions, for the paired comparisons of `task_comparison`)."""
    preds = task.predict(model, tokenizer, examples, cfg.batch_size)
    res = task.score(preds, examples)
    metrics = {k: float(v) for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"name": task.name, "primary_metric": task.primary_metric, "examples": len(examples), "metrics": metrics,
            "predictions": preds}


def _primary_only(task):
    """The task scoring its primary metric only (the gates' statistic; the others would only cost resamples)."""
    from dataclasses import replace

    return replace(task, metrics=[task.primary_metric])


def _score_interval(task, preds: list, examples: list):
    from ..stats import statistic_interval

    one = _primary_only(task)
    if hasattr(one, "score_intervals"):
        return one.score_intervals(preds, examples)[task.primary_metric]
    return statistic_interval(len(examples), _primary_stat(one, preds, examples))


def _paired_interval(task, preds_a: list, preds_b: list, examples: list):
    """Interval of a's primary metric minus b's on the same examples (paired bootstrap)."""
    from ..stats import paired_statistic_difference

    one = _primary_only(task)
    if hasattr(one, "paired_intervals"):
        return one.paired_intervals(preds_a, preds_b, examples)[task.primary_metric]
    return paired_statistic_difference(len(examples), _primary_stat(one, preds_a, examples),
                                       _primary_stat(one, preds_b, examples))


def _primary_stat(task, preds: list, examples: list):
    return lambda idx: task.score([preds[i] for i in idx], [examples[i] for i in idx])[task.primary_metric]


def task_comparison(task, examples: list, preds: list, zero_shot_preds: list | None = None,
                    champion_preds: list | None = None) -> dict[str, float]:
    """The gates' task numbers of a delta, all on the same examples: `task_score` (its primary metric) with its 95%
    interval, `task_vs_zero_shot` (minus its base scored zero-shot) and `task_vs_champion` (minus the champion's
    predictions) as paired differences with their intervals (`_ci_low`, `_ci_high`), and the references' own scores
    (`zero_shot_task_score`, `champion_task_score`). A reference without predictions is left out."""
    one = _primary_only(task)
    out = _score_interval(task, preds, examples).metrics("task_score")
    for name, ref in (("zero_shot", zero_shot_preds), ("champion", champion_preds)):
        if ref is None:
            continue
        out.update(_paired_interval(task, preds, ref, examples).metrics(f"task_vs_{name}"))
        out[f"{name}_task_score"] = float(one.score(ref, examples)[task.primary_metric])
    return out


_ZERO_SHOT: dict[tuple, list] = {}  # (base key, task, examples, batch size) -> the base's zero-shot predictions


def zero_shot_predictions(base_load: Callable[[], tuple], task, examples: list, cfg: ValidateConfig,
                          base_key: str | None = None) -> list:
    """The base's zero-shot predictions of the examples (`task.predict(..., zero_shot=True)`), kept in memory per
    `base_key` for the next delta of the same base and task (a LoRA and a full fine-tune share them)."""
    fp = sha256_text("\x1f".join(f"{e.source}\x1e{e.input}" for e in examples))
    key = (base_key, task.name, fp, cfg.batch_size)
    if base_key is not None and key in _ZERO_SHOT:
        return _ZERO_SHOT[key]
    base, tok = base_load()
    preds = task.predict(base, tok, examples, cfg.batch_size, zero_shot=True)
    del base
    if base_key is not None:
        if len(_ZERO_SHOT) >= 16:
            _ZERO_SHOT.clear()
        _ZERO_SHOT[key] = preds
    return preds


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


def _measure_beside(model, tokenizer, cfg: ValidateConfig, metrics: dict, seconds: dict, task_data_, task_report,
                    champion_load, no_champion: str, base_load, base_key) -> dict[str, str]:
    """The measurements that need a reference in the same run (run_suite's docstring), into `metrics` and
    `seconds`; returns what could not be measured and why."""
    unmeasured: dict[str, str] = {}
    t = time.perf_counter()
    champion = None
    if champion_load is not None:
        try:
            champion = champion_load()
        except CpmantError as e:  # a champion whose checkpoint is gone: its comparisons are skipped, saying why
            no_champion = f"the champion could not be loaded: {e.problem}"[:300]
    models = {"candidate": (model, tokenizer), **({"champion": champion} if champion else {})}
    timings = measure_timings(models, cfg)
    metrics.update(timings["candidate"])
    metrics.update({f"champion_{k}": v for k, v in timings.get("champion", {}).items()})
    if champion is None:
        unmeasured.update({f"champion_{m}": no_champion for m in TIMED_METRICS})
    seconds["timings"] = time.perf_counter() - t
    if task_report is None:
        return unmeasured
    task, examples = task_data_
    t = time.perf_counter()
    champ_preds = None if champion is None else task.predict(*champion, examples, cfg.batch_size)
    del champion, models
    zs_preds = None if base_load is None else zero_shot_predictions(base_load, task, examples, cfg, base_key)
    seconds["references"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics.update(task_comparison(task, examples, task_report.pop("predictions"), zs_preds, champ_preds))
    seconds["intervals"] = time.perf_counter() - t
    # no base: task_vs_zero_shot stays missing, so its gate fails (a delta is promoted only with that evidence)
    if champ_preds is None:
        unmeasured["task_vs_champion"] = no_champion
    return unmeasured


def run_suite(load: Callable[[], tuple], data_dir: str | Path, cfg: ValidateConfig | None = None, *,
              stage: str = "pretrain", task: str | None = None, task_data: str | None = None,
              progress: bool = False, champion_load: Callable[[], tuple] | None = None,
              no_champion: str = "no champion", base_load: Callable[[], tuple] | None = None,
              base_key: str | None = None) -> dict:
    """Load (with `load()` -> (model, tokenizer)) and measure one model; the report dict:
    {"kind", "metrics", "samples", "task", "model_config", "seconds", "settings", "unmeasured"}. `data_dir` is the
    checkpoint folder whose data lineage gives the held-out split (a delta's base folder for a delta); `task` and
    `task_data`: a delta's task and its data folder (cfg.task_data wins).

    References measured in the same run: `champion_load` loads the champion of the candidate's name (None: there is
    none, or it is the candidate; `no_champion` says which), timed in alternation with the candidate
    (`champion_tokens_per_second`, `champion_first_token_ms_p50/p95`) and, for a delta, scored on the same test
    examples; `base_load` loads a delta's base, scored zero-shot (`base_key` keeps its predictions for the next delta
    of that base). `unmeasured`: metric -> why it was not measured (for the gates' skip reasons)."""
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
        task_report = None
        if task:
            t = time.perf_counter()
            task_report = measure_task(model, tokenizer, *task_data_, cfg)
            seconds["task"] = time.perf_counter() - t
            metrics.update({f"eval_{k}": v for k, v in task_report["metrics"].items()})
    metrics["peak_memory_mb"] = pm.peak_mb  # the candidate alone: the references are loaded below
    if pm.cuda_peak_mb is not None:
        metrics["cuda_peak_memory_mb"] = pm.cuda_peak_mb
    unmeasured = _measure_beside(model, tokenizer, cfg, metrics, seconds, task_data_, task_report,
                                 champion_load, no_champion, base_load, base_key)
    mc = model.config
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return {"kind": model_kind(stage, mc), "stage": stage, "metrics": metrics, "samples": samples,
            "task": task_report, "seconds": seconds, "settings": cfg.measurement(), "unmeasured": unmeasured,
            "model_config": {k: getattr(mc, k) for k in ("vocab_size", "dim_model", "num_layers", "num_heads",
                                                         "dim_ff", "quantization", "moe_experts", "moe_top_k")
                             if hasattr(mc, k)}}
