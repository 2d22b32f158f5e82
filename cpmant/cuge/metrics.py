"""CUGE metrics, all in percent (0-100, higher is better, as CUGE and CPM-2 report them).

From kept libraries: accuracy and macro-F1 (scikit-learn), ROUGE-L on characters (rouge-score with a character
tokenizer: its default tokenizer keeps only [a-z0-9] and would drop every Chinese character), corpus BLEU
(sacrebleu, tokenize="zh"), nDCG@k (scikit-learn's ndcg_score on exponential gains 2^rel - 1, one query at a time,
averaged over the queries that have a relevant document: `ndcg_per_query` says which were left out).
By hand, because no kept library has them: Distinct-n (Li et al. 2016: distinct n-grams / all n-grams over all
responses, on characters; a few lines) and Math23K answer accuracy (an answer is right when the value of the
generated equation equals the gold answer; the equations are evaluated by `mathexpr`, a safe parser, never eval).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from .mathexpr import try_evaluate

log = logging.getLogger(__name__)

# Math23K answers: right when |value - gold| < MATH_ABS_TOL, the tolerance of the usual Math23K evaluation (GTS,
# Graph2Tree: abs(pred - gold) < 1e-4), gold being the value of the gold equation. A relative tolerance would call
# 10001 right for 10000; MATH_REL_TOL only absorbs float rounding on large values.
MATH_ABS_TOL = 1e-4
MATH_REL_TOL = 1e-9


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    from sklearn.metrics import accuracy_score

    if not labels:
        return 0.0
    return 100.0 * float(accuracy_score(list(labels), list(predictions)))


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Macro-F1 over the answer classes (the option positions 0..3 for CCPM); micro-F1 would equal accuracy."""
    from sklearn.metrics import f1_score

    if not labels:
        return 0.0
    return 100.0 * float(f1_score(list(labels), list(predictions), average="macro", zero_division=0))


class _CharTokenizer:
    """rouge-score tokenizer: every non-space character is a token (Chinese ROUGE is computed on characters)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure on characters."""
    from rouge_score import rouge_scorer

    if not references:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))
    return 100.0 * total / len(references)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, Chinese tokenizer: each CJK character is a token)."""
    import sacrebleu

    if not references:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh").score)


def distinct_n(predictions: Sequence[str], n: int) -> float:
    """Distinct-n on characters: distinct n-grams / total n-grams over all responses (0 when there are none).

    By hand: none of scikit-learn, sacrebleu or rouge-score computes it, and it is a set and a count."""
    total, seen = 0, set()
    for text in predictions:
        chars = [c for c in text if not c.isspace()]
        grams = [tuple(chars[i:i + n]) for i in range(len(chars) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return 100.0 * len(seen) / total if total else 0.0


def ndcg_per_query(scores: Sequence[float], relevance: Sequence[float], groups: Sequence[str],
                   k: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """nDCG@k (0-1) of each query where it is defined, and the queries left out with the reason.

    Gain 2^rel - 1 (exponential, as Burges et al. and the MSLR / TREC Web and NTCIR WWW evaluations that Sogou-Log's
    graded labels come from define it; for 0/1 labels it equals linear gain), discount 1/log2(rank + 1), ties in
    score averaged (sklearn's ndcg_score, given the exponential gains as its y_true). Left out, as CUGE leaves
    them out of the mean: a query with no relevant document ("no_relevant": its ideal DCG is 0, so nDCG is 0/0)
    and a query with a single document ("single": sklearn refuses it, and any order is ideal)."""
    from sklearn.metrics import ndcg_score

    by_group: dict[str, tuple[list[float], list[float]]] = {}
    for s, r, g in zip(scores, relevance, groups):
        ss, rr = by_group.setdefault(g, ([], []))
        ss.append(float(s))
        rr.append(float(r))
    values: dict[str, float] = {}
    left_out: dict[str, list[str]] = {"no_relevant": [], "single": []}
    for g, (ss, rr) in by_group.items():
        if max(rr) <= 0:
            left_out["no_relevant"].append(g)
        elif len(ss) < 2:
            left_out["single"].append(g)
        else:
            values[g] = float(ndcg_score([[2.0 ** r - 1.0 for r in rr]], [ss], k=k))
    return values, left_out


def ndcg_at_k(scores: Sequence[float], relevance: Sequence[float], groups: Sequence[str], k: int) -> float:
    """Mean nDCG@k (percent) over the queries where it is defined (`ndcg_per_query`: exponential gain; queries
    with no relevant document, or a single document, are left out and their count logged); 0 when none is."""
    values, left_out = ndcg_per_query(scores, relevance, groups, k)
    if left_out["no_relevant"] or left_out["single"]:
        log.info("nDCG@%d over %d queries: %d without a relevant document and %d with one document left out",
                 k, len(values), len(left_out["no_relevant"]), len(left_out["single"]))
    return 100.0 * sum(values.values()) / len(values) if values else 0.0


def math_answer_accuracy(predictions: Sequence[str], answers: Sequence[float | None]) -> float:
    """Share of generated equations whose value equals the gold answer (within MATH_ABS_TOL).

    By hand: no kept library evaluates Math23K equations; `mathexpr.try_evaluate` parses them safely. A generated
    text that does not parse is wrong; so is an example whose gold answer is unknown (None)."""
    if not answers:
        return 0.0
    right = 0
    for pred, gold in zip(predictions, answers):
        value = try_evaluate(pred)
        if value is not None and gold is not None and math.isclose(value, gold, rel_tol=MATH_REL_TOL,
                                                                   abs_tol=MATH_ABS_TOL):
            right += 1
    return 100.0 * right / len(answers)
