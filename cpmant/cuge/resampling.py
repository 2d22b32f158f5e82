"""A task metric as a statistic of resamplable units, for its bootstrap interval (`Task.score_intervals`,
`Task.paired_intervals`, `Task.paired_ratio`; the resampling itself is `cpmant.stats`).

- mean-decomposable metrics (accuracy, ROUGE-L, Math23K answer accuracy): one value per example (the metric of
  that example alone); the score is their mean, resampled by `mean_interval` / `paired_difference`.
- nDCG@k: one value per query (the metric of that query's documents alone); queries without a value (a single
  document, or no relevant document) are not units; queries are resampled, never single documents.
- corpus metrics (macro-F1, Distinct-n, BLEU): recomputed on the resampled example indices
  (`statistic_interval`); BLEU from per-sentence n-gram counts summed over the resample (sacrebleu's
  `BLEU.compute_bleu`, the same smoothing as `metrics.bleu`), since re-tokenising every resample is slow; macro-F1
  from per-class counts (sklearn's definition; its f1_score is too slow to call ~1,500 times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..stats import Interval, mean_interval, paired_difference, paired_ratio, paired_statistic_difference, \
    statistic_interval
import cpmant.cuge.metrics as M  # noqa: N812  (by name: `from . import` would import the package, a cycle)


@dataclass(frozen=True)
class MetricStatistic:
    """A metric over `n` units: per-unit `values` (the metric is their mean), or `fn(idx)` on unit indices."""

    n: int
    values: np.ndarray | None = None
    fn: Callable[[np.ndarray], float] | None = None

    def __call__(self, idx: np.ndarray) -> float:
        if self.values is not None:
            return float(self.values[idx].mean()) if len(idx) else 0.0
        return float(self.fn(idx))

    def interval(self, seed: int = 0) -> Interval:
        if self.n == 0:  # no unit (e.g. no query with a relevant document): the score is 0 with no spread
            return Interval(0.0, 0.0, 0.0, 0)
        if self.values is not None:
            return mean_interval(self.values, seed=seed)
        return statistic_interval(self.n, self, seed=seed)


def paired(a: MetricStatistic, b: MetricStatistic, seed: int = 0) -> Interval:
    """a minus b on the same resampled units."""
    if a.n == 0:
        return Interval(0.0, 0.0, 0.0, 0)
    if a.values is not None and b.values is not None:
        return paired_difference(a.values, b.values, seed=seed)
    return paired_statistic_difference(a.n, a, b, seed=seed)


def ratio(a: MetricStatistic, b: MetricStatistic, seed: int = 0) -> Interval:
    """a / b on the same resampled units."""
    if a.n == 0:
        return Interval(0.0, 0.0, 0.0, 0)
    return paired_ratio(a.n, a, b, seed=seed)


def _per_example(fn, predictions, targets) -> MetricStatistic:
    return MetricStatistic(len(predictions), values=np.array([fn([p], [t]) for p, t in zip(predictions, targets)],
                                                             dtype=np.float64))


def _corpus(fn, predictions, targets=None) -> MetricStatistic:
    preds = list(predictions)
    if targets is None:
        return MetricStatistic(len(preds), fn=lambda idx: fn([preds[i] for i in idx]))
    gold = list(targets)
    return MetricStatistic(len(preds), fn=lambda idx: fn([preds[i] for i in idx], [gold[i] for i in idx]))


def _macro_f1(predictions, labels) -> MetricStatistic:
    """Macro-F1 as metrics.macro_f1 (sklearn: F1 per class present in the labels or predictions, averaged) from
    per-class counts: by hand with np.bincount because sklearn's f1_score costs ~1 ms a call and an interval needs
    ~1,500 calls (resamples + BCa's jackknife); tests check it equals sklearn's."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    k = int(max(y.max(initial=0), p.max(initial=0))) + 1

    def fn(idx):
        yi, pi = y[idx], p[idx]
        true, pred = np.bincount(yi, minlength=k), np.bincount(pi, minlength=k)
        tp = np.bincount(yi[yi == pi], minlength=k)
        present = (true + pred) > 0
        return float(100.0 * np.mean(2 * tp[present] / (true + pred)[present])) if present.any() else 0.0

    return MetricStatistic(len(y), fn=fn)


def _bleu(predictions, references) -> MetricStatistic:
    from sacrebleu.metrics import BLEU

    scorer = BLEU(tokenize="zh")
    parts = [scorer.corpus_score([p], [[r]]) for p, r in zip(predictions, references)]
    counts = np.array([s.counts for s in parts], dtype=np.int64)
    totals = np.array([s.totals for s in parts], dtype=np.int64)
    lens = np.array([(s.sys_len, s.ref_len) for s in parts], dtype=np.int64)

    def fn(idx):
        c, t, (sys_len, ref_len) = counts[idx].sum(0), totals[idx].sum(0), lens[idx].sum(0)
        return float(BLEU.compute_bleu(c.tolist(), t.tolist(), int(sys_len), int(ref_len),
                                       smooth_method="exp").score)

    return MetricStatistic(len(parts), fn=fn)


def _ndcg(scores, relevance, groups, k: int) -> MetricStatistic:
    """Per-query nDCG (metrics.ndcg_per_query: the queries it leaves out are not units)."""
    values, _ = M.ndcg_per_query(scores, relevance, groups, k)
    return MetricStatistic(len(values), values=100.0 * np.array(list(values.values()), dtype=np.float64))


def metric_statistic(task, metric: str, predictions: list, examples: list) -> MetricStatistic:
    """The statistic of `metric` (one of task.metrics) for predictions of `examples`."""
    labels = lambda: [ex.label for ex in examples]  # noqa: E731
    if metric == "accuracy":
        return _per_example(M.accuracy, predictions, labels())
    if metric == "f1":
        return _macro_f1(predictions, labels())
    if metric == "rouge_l":
        return _per_example(M.rouge_l, predictions, [ex.target for ex in examples])
    if metric == "bleu":
        return _bleu(predictions, [ex.target for ex in examples])
    if metric.startswith("distinct"):
        n = int(metric.removeprefix("distinct"))
        return _corpus(lambda p: M.distinct_n(p, n), predictions)
    if metric.startswith("ndcg_"):
        return _ndcg(predictions, [ex.label or 0 for ex in examples], [ex.group for ex in examples],
                     int(metric.removeprefix("ndcg_")))
    if metric == "answer_accuracy":
        return _per_example(M.math_answer_accuracy, predictions, [ex.answer for ex in examples])
    raise ValueError(f"unknown metric {metric}")  # a task lists only the metrics above


def seed_mean(stats: list[MetricStatistic]) -> MetricStatistic:
    """The mean over several runs (e.g. tuning seeds) of one metric on the same units: per-unit means where every
    run has per-unit values (the same mean), else the runs' statistics averaged on each resample."""
    if not stats or len({s.n for s in stats}) != 1:
        raise ValueError("seed_mean needs at least one statistic, all over the same units")
    if all(s.values is not None for s in stats):
        return MetricStatistic(stats[0].n, values=np.mean([s.values for s in stats], axis=0))
    return MetricStatistic(stats[0].n, fn=lambda idx: float(np.mean([s(idx) for s in stats])))
