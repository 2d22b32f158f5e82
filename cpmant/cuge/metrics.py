"""CUGE metrics, all in percent (0-100, higher is better, as CUGE and CPM-2 report them).

From kept libraries: accuracy and macro-F1 (scikit-learn), ROUGE-L on characters (rouge-score with a character
tokenizer: its default tokenizer keeps only [a-z0-9] and would drop every Chinese character), corpus BLEU
(sacrebleu, tokenize="zh"), nDCG@k (scikit-learn's ndcg_score, one query at a time, averaged over queries).
By hand, because no kept library has them: Distinct-n (Li et al. 2016: distinct n-grams / all n-grams over all
responses, on characters; a few lines) and Math23K answer accuracy (an answer is right when the value of the
generated equation equals the gold answer; the equations are evaluated by `mathexpr`, a safe parser, never eval).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .mathexpr import try_evaluate

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


def ndcg_at_k(scores: Sequence[float], relevance: Sequence[float], groups: Sequence[str], k: int) -> float:
    """Mean nDCG@k over queries (sklearn's ndcg_score on each query's documents).

    A query with a single document is left out (nDCG is undefined there; sklearn refuses it); a query whose
    documents are all irrelevant scores 0, as sklearn scores it."""
    from sklearn.metrics import ndcg_score

    by_group: dict[str, tuple[list[float], list[float]]] = {}
    for s, r, g in zip(scores, relevance, groups):
        ss, rr = by_group.setdefault(g, ([], []))
        ss.append(float(s))
        rr.append(float(r))
    values = [ndcg_score([rr], [ss], k=k) for ss, rr in by_group.values() if len(ss) > 1]
    return 100.0 * sum(values) / len(values) if values else 0.0


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
