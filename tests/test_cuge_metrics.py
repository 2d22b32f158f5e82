"""CUGE metrics against values worked out by hand, and the safe Math23K equation parser."""

import math

import pytest

from cpmant.cuge import metrics as M
from cpmant.cuge.mathexpr import EquationError, evaluate_expression, try_evaluate

pytestmark = pytest.mark.unit


def test_accuracy_and_macro_f1():
    assert M.accuracy([0, 1, 2, 3], [0, 1, 2, 0]) == pytest.approx(75.0)
    # class 0: P 1, R 1/2, F1 2/3; class 1: P 2/3, R 1, F1 4/5; macro = (2/3 + 4/5) / 2
    assert M.macro_f1([0, 1, 1, 1], [0, 0, 1, 1]) == pytest.approx(100 * (2 / 3 + 0.8) / 2)


def test_rouge_l_on_characters():
    # LCS(我在北京, 我爱北京) = 我北京: P = R = 3/4
    assert M.rouge_l(["我在北京"], ["我爱北京"]) == pytest.approx(75.0)
    # LCS = 天气好 (3): P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3; mean with a perfect match
    assert M.rouge_l(["天气好", "你好"], ["今天天气很好", "你好"]) == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert M.rouge_l(["完全不同"], ["毫无关系"]) == 0.0


def test_bleu_zh():
    # every n-gram of the 7-character hypothesis is in the 9-character reference: precisions 1, BP = e^(1-9/7)
    assert M.bleu(["我爱北京天安门"], ["我爱北京天安门广场"]) == pytest.approx(100 * math.exp(1 - 9 / 7), abs=1e-3)
    assert M.bleu(["今天天气很好"], ["今天天气很好"]) == pytest.approx(100.0)


def test_distinct_n():
    # characters 好好好 + 好的: unigrams 5, distinct {好, 的}; bigrams 好好 好好 好的: 3, distinct 2
    assert M.distinct_n(["好好好", "好的"], 1) == pytest.approx(40.0)
    assert M.distinct_n(["好好好", "好的"], 2) == pytest.approx(200 / 3)
    assert M.distinct_n(["好"], 2) == 0.0


def test_ndcg_at_k_by_query():
    scores = [0.9, 0.8, 0.1, 0.5, 0.4, 0.3]
    rel = [0, 2, 1, 2, 1, 1]
    groups = ["a", "a", "a", "b", "b", "c"]  # c has one document: left out
    # gains 2^rel - 1: a: DCG = 0/log2 2 + 3/log2 3 + 1/log2 4; IDCG = 3/log2 2 + 1/log2 3; b is in ideal order (1.0)
    a = (3 / math.log2(3) + 1 / 2) / (3 + 1 / math.log2(3))
    assert M.ndcg_at_k(scores, rel, groups, k=3) == pytest.approx(100 * (a + 1) / 2)
    assert M.ndcg_at_k(scores, rel, groups, k=1) == pytest.approx(50.0)  # a's top document is irrelevant


@pytest.mark.parametrize("text,value", [
    ("x=3+5", 8), ("x=200*(1-20%)", 160), ("x=12*(1-(1/3))", 8), ("x=3(1/2)+2", 5.5), ("5(1/2)", 5.5),
    ("x=2^3^2", 512), ("-2^2", -4), ("2**-1", 0.5), ("x=10/50%", 20), ("（1＋2）×3÷4", 2.25), ("x = .5 * 4", 2),
    ("x=2*2^3", 16), ("50%%", 0.005),
])
def test_equation_values(text, value):
    assert evaluate_expression(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["x=3+", "x=12/(3-3)", "__import__('os').system('true')", "x=1e5", "2^1000",
                                  "x=y+1", "3)", "", "x=(-8)^(1/3)", "abs(1)"])
def test_equation_rejects(text):
    with pytest.raises(EquationError):
        evaluate_expression(text)
    assert try_evaluate(text) is None


def test_math_answer_accuracy():
    preds = ["x=3+5", "x=3*5", "不是方程", "x=0.5*4", "x=1/3"]
    answers = [8, 8, 1, 2.0, 0.33333]  # 1/3 - 0.33333 = 3.3e-6: within the tolerance 1e-4
    assert M.math_answer_accuracy(preds, answers) == pytest.approx(60.0)
    # absolute tolerance 1e-4 (GTS / Graph2Tree's Math23K evaluation), not relative: 10001 is not 10000
    assert M.math_answer_accuracy(["x=10001", "x=9999.99995", "x=33.33", "x=100/3", "x=33(1/3)"],
                                  [10000, 10000, 100 / 3, 100 / 3, 100 / 3]) == pytest.approx(60.0)
    assert M.math_answer_accuracy(["x=1"], [None]) == 0.0
