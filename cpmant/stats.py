"""Uncertainty of a score: 95% bootstrap intervals over examples, alone or paired (two models on the same examples).

    iv = mean_interval(per_example_values)                          # a mean-decomposable metric (accuracy, ROUGE-L)
    iv = statistic_interval(n, lambda idx: f1(preds[idx], gold[idx]))  # a corpus metric (macro-F1, BLEU): recomputed
    d  = paired_difference(a_values, b_values)                      # mean(a - b) over the same examples
    d  = paired_statistic_difference(n, stat_a, stat_b)             # stat_a(idx) - stat_b(idx), same resampled idx

Every function returns an `Interval(value, low, high, n, confidence)`; `value` is the statistic on all examples.
The resampling is scipy's `bootstrap` (BCa by default, percentile where BCa is undefined, e.g. a statistic whose
jackknife values are all equal), seeded, so the same inputs give the same interval. A paired interval resamples
example indices once and evaluates both models on the same resample: it is far narrower than two separate
intervals when the models agree on most examples, which is what makes small differences decidable.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on all examples
    low: float
    high: float
    n: int  # examples (resampling units)
    confidence: float = CONFIDENCE

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return asdict(self)

    def metrics(self, name: str) -> dict[str, float]:
        """`{name: value, name_ci_low: low, name_ci_high: high}`, the MLflow names of a score and its interval."""
        return {name: self.value, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def _interval(samples: tuple, statistic: Callable, value: float, n: int, *, vectorized: bool, paired: bool,
              confidence: float, n_resamples: int, seed: int, method: str) -> Interval:
    from scipy.stats import bootstrap

    if n < 2:
        return Interval(value, value, value, n, confidence)
    kw = dict(vectorized=vectorized, paired=paired, confidence_level=confidence, n_resamples=n_resamples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning: handled below
        res = bootstrap(samples, statistic, method=method, rng=np.random.default_rng(seed), **kw)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isfinite(low) and math.isfinite(high)) and method != "percentile":
            res = bootstrap(samples, statistic, method="percentile", rng=np.random.default_rng(seed), **kw)
            low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # every resample gave the same value
        low = high = value
    return Interval(value, min(low, value), max(high, value), n, confidence)


def mean_interval(values, *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0,
                  method: str = "BCa") -> Interval:
    """The mean of per-example values with its bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values: an interval needs at least one example")
    return _interval((x,), lambda s, axis=-1: np.mean(s, axis=axis), float(x.mean()), x.size, vectorized=True,
                     paired=False, confidence=confidence, n_resamples=n_resamples, seed=seed, method=method)


def statistic_interval(n: int, statistic: Callable[[np.ndarray], float], *, confidence: float = CONFIDENCE,
                       n_resamples: int = N_RESAMPLES, seed: int = 0, method: str = "BCa") -> Interval:
    """A statistic of `n` examples that is not a mean of per-example values (macro-F1, corpus BLEU, Distinct-n):
    `statistic(idx)` computes it on the examples at integer indices `idx` (with repeats)."""
    if n <= 0:
        raise ValueError("no examples: an interval needs at least one example")
    idx = np.arange(n)
    return _interval((idx,), lambda i: float(statistic(np.asarray(i, dtype=np.int64))), float(statistic(idx)), n,
                     vectorized=False, paired=False, confidence=confidence, n_resamples=n_resamples, seed=seed,
                     method=method)


def paired_difference(a, b, *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0,
                      method: str = "BCa") -> Interval:
    """mean(a) - mean(b) of two models' per-example values on the same examples, resampled together."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length ({a.size} vs {b.size}): score both on the same examples")
    return mean_interval(a - b, confidence=confidence, n_resamples=n_resamples, seed=seed, method=method)


def paired_statistic_difference(n: int, stat_a: Callable[[np.ndarray], float], stat_b: Callable[[np.ndarray], float],
                                **kw) -> Interval:
    """stat_a(idx) - stat_b(idx) on the same resampled example indices (corpus metrics of two models)."""
    return statistic_interval(n, lambda i: stat_a(i) - stat_b(i), **kw)


def paired_ratio(n: int, stat_a: Callable[[np.ndarray], float], stat_b: Callable[[np.ndarray], float],
                 **kw) -> Interval:
    """stat_a(idx) / stat_b(idx) on the same resampled indices (e.g. LoRA's score as a share of full tuning's);
    a resample where stat_b is 0 counts as 0 share (stat_a 0) or infinite share."""
    def ratio(i):
        a, b = stat_a(i), stat_b(i)
        if b == 0:
            return 0.0 if a == 0 else math.inf
        return a / b

    return statistic_interval(n, ratio, **kw)
