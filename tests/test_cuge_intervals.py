"""Intervals on task scores (Task.score_intervals, paired_intervals, paired_ratio) against hand-worked values."""

import math

import pytest

from cpmant.cuge import Example, get_task
from cpmant.cuge import metrics as M
from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit


def _choice(labels):
    return [Example(input=f"q{i}", options=("a", "b", "c", "d"), label=y) for i, y in enumerate(labels)]


def test_accuracy_interval_matches_the_normal_approximation():
    # 500 examples, 300 right: p = 0.6; the normal approximation's half-width is 1.96 * sqrt(p(1-p)/n) = 4.294 pts
    n, right = 500, 300
    labels = [i % 4 for i in range(n)]
    preds = [y if i < right else (y + 1) % 4 for i, y in enumerate(labels)]
    iv = get_task("demo-c3").score_intervals(preds, _choice(labels))["accuracy"]
    half = 100 * 1.96 * math.sqrt(0.6 * 0.4 / n)
    assert iv.value == pytest.approx(60.0)
    assert iv.n == n
    assert iv.low == pytest.approx(60.0 - half, abs=0.6)
    assert iv.high == pytest.approx(60.0 + half, abs=0.6)


def test_paired_difference_where_two_models_differ_on_k_examples():
    # 400 examples; a and b agree everywhere except 8 examples that a gets right and b wrong: a - b = 8/400 = 2 pts;
    # the per-example differences are 100 on 8 examples, 0 elsewhere: standard error 100 * sqrt(.02 * .98 / 400)
    n, k = 400, 8
    labels = [i % 4 for i in range(n)]
    b = [y if i % 2 else (y + 1) % 4 for i, y in enumerate(labels)]  # half right
    a = list(b)
    changed = [i for i in range(n) if b[i] != labels[i]][:k]
    for i in changed:
        a[i] = labels[i]
    task, ex = get_task("demo-c3"), _choice(labels)
    d = task.paired_intervals(a, b, ex)["accuracy"]
    se = 100 * math.sqrt(0.02 * 0.98 / n)
    assert d.value == pytest.approx(2.0)
    assert d.low > 0  # decidable although the two separate intervals overlap almost entirely
    assert d.high - d.low == pytest.approx(2 * 1.96 * se, rel=0.3)
    sep_a, sep_b = (task.score_intervals(p, ex)["accuracy"] for p in (a, b))
    assert sep_a.low < sep_b.high  # separately, the intervals overlap
    same = task.paired_intervals(b, b, ex)["accuracy"]
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_ratio_of_the_primary_metric():
    # c3's primary is accuracy: a right on 45 of 100, b on 50 (a's right ones among b's): ratio 0.9
    labels = [i % 4 for i in range(100)]
    b = [y if i < 50 else (y + 1) % 4 for i, y in enumerate(labels)]
    a = [y if i < 45 else (y + 1) % 4 for i, y in enumerate(labels)]
    task = get_task("demo-c3")
    r = task.paired_ratio(a, b, _choice(labels))
    assert r.value == pytest.approx(0.9)
    assert r.low < 0.9 < r.high and r.high <= 1.0  # a never beats b on any resample
    same = task.paired_ratio(b, b, _choice(labels))
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0)


def test_corpus_metrics_are_recomputed_and_agree_with_the_score():
    labels = [i % 4 for i in range(60)]
    preds = [(y + (i % 3 == 0)) % 4 for i, y in enumerate(labels)]
    task = get_task("demo-ccpm")  # f1 (macro, a corpus metric) and accuracy
    ivs, scores = task.score_intervals(preds, _choice(labels)), task.score(preds, _choice(labels))
    for m in task.metrics:
        assert ivs[m].value == pytest.approx(scores[m])
        assert ivs[m].low < scores[m] < ivs[m].high
    kd = get_task("kdconv")  # BLEU from summed per-sentence counts must equal sacrebleu's corpus BLEU
    refs = ["今天天气很好", "我爱北京天安门广场", "你好吗", "明天会下雨吗"]
    hyps = ["今天天气好", "我爱北京天安门", "你好", "明天下雨"]
    ex = [Example(input="x", target=r) for r in refs]
    got = kd.score_intervals(hyps, ex)
    assert got["bleu"].value == pytest.approx(M.bleu(hyps, refs))
    assert got["distinct2"].value == pytest.approx(M.distinct_n(hyps, 2))


def test_ndcg_resamples_queries_and_leaves_out_all_irrelevant_ones():
    task = get_task("sogou-log")
    ex, scores = [], []
    for q in range(6):  # queries 0-4: two documents, the relevant one ranked first on even queries; 5: none relevant
        for d, rel in enumerate((1, 0)):
            ex.append(Example(input=f"q{q} d{d}", label=0 if q == 5 else rel, group=f"q{q}"))
            scores.append(float(d if q % 2 else -d))  # odd queries rank the irrelevant document first
    ivs = task.score_intervals(scores, ex)
    # nDCG@10 of [irrelevant, relevant] = (1/log2 3) / 1 = 0.6309; 3 perfect queries, 2 at 0.6309, 5 units
    assert ivs["ndcg_10"].n == 5
    assert ivs["ndcg_10"].value == pytest.approx(100 * (3 + 2 / math.log2(3)) / 5)


def test_mismatched_predictions_are_an_error():
    task = get_task("demo-c3")
    with pytest.raises(CpmantError, match="predictions"):
        task.score_intervals([0, 1], _choice([0, 1, 2]))
    with pytest.raises(CpmantError, match="predictions"):
        task.paired_ratio([0, 1, 2], [0, 1], _choice([0, 1, 2]))


def test_fast_macro_f1_equals_sklearn_on_resamples():
    import numpy as np

    from cpmant.cuge.resampling import metric_statistic

    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 80).tolist(), rng.integers(0, 3, 80).tolist()  # class 3 never predicted
    stat = metric_statistic(get_task("demo-ccpm"), "f1", preds, _choice(labels))
    for _ in range(20):
        idx = rng.integers(0, 80, 80)
        assert stat(idx) == pytest.approx(M.macro_f1([preds[i] for i in idx], [labels[i] for i in idx]))
