"""CUGE scoring as CPM-Live does it (issue 16): generation with beam 3 and no repetition penalty, per-task max_len
capped by the model's positions (said once), zero-shot rows with the pretraining prompt, nDCG with queries that have
no relevant document left out and counted."""

import dataclasses
import math
import warnings

import pytest
import torch

from conftest import micro_lm
from cpmant.cuge import get_task
from cpmant.cuge import metrics as M
from cpmant.cuge.base import Example
from cpmant.cuge.formatting import Formatter, TuningPrompt, generate_tuned
from cpmant.generate import generate
from cpmant.generation_config import GenerationConfig
from cpmant.training.data import TASK_LM

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def micro(fixture_corpus, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    # a position limit of 2048 (the 10B's), so that no CPM-Live max_len is capped
    model, tok = micro_lm(fixture_corpus, tmp_path_factory.mktemp("vocab"), position_bias_max_distance=2048)
    model.eval()
    yield model, tok
    torch.set_num_threads(before)


# ---- generation settings ----------------------------------------------------------------------------------------
def test_predict_generates_with_cpm_lives_cuge_settings(micro):
    model, tok = micro
    task = dataclasses.replace(get_task("lcsts"), max_new_tokens=6)
    settings = task.generation_settings()
    assert settings == {"max_new_tokens": 6, "temperature": 0.0, "num_beams": 3, "repetition_penalty": 1.0}
    cfg = GenerationConfig.from_params(settings)
    assert (cfg.num_beams, cfg.repetition_penalty) == (3, 1.0)  # not GenerationConfig's default penalty 1.2
    examples = [Example(f"{t}\n摘要：", target="x") for t in ("床前明月光，疑是地上霜", "春眠不觉晓", "白日依山尽")]
    texts = [ex.input for ex in examples]
    tuned = TuningPrompt(model, 1)
    expected = generate(tuned, tok, texts, cfg)
    old = generate(tuned, tok, texts, {"max_new_tokens": 6, "num_beams": 1, "repetition_penalty": 1.2})
    assert expected != old  # the micro model tells the settings apart: the next line checks which reached it
    assert task.predict(model, tok, examples, batch_size=2) == expected
    # an override still wins
    greedy = {"max_new_tokens": 6, "num_beams": 1, "repetition_penalty": 1.0}
    assert task.predict(model, tok, examples, generation={"num_beams": 1}) == generate(tuned, tok, texts, greedy)


# ---- max_len per task -------------------------------------------------------------------------------------------
CPM_LIVE_MAX_LEN = {"ccpm": 256, "c3": 1024, "sogou-log": 256, "lcsts": 256, "kdconv": 1500, "math23k": 256}


@pytest.mark.parametrize("name,max_len", CPM_LIVE_MAX_LEN.items())
def test_rows_are_as_long_as_cpm_lives_max_len(micro, name, max_len):
    model, tok = micro
    task = get_task(name)
    assert task.max_len == max_len and task.effective_max_len(model) == max_len  # 2048 positions: no cap
    long = "床前明月光疑是地上霜举头望明月低头思故乡" * 200  # thousands of tokens: cut from the left
    fmt = Formatter(model, tok, task.effective_max_len(model))
    if task.kind == "generation":
        batch, _ = fmt.generation_batch([Example(long, target="春眠不觉晓")])
    else:
        batch, _ = fmt.judge_batch([(long, "是")])
    assert int(batch["length"][0]) == max_len and int(batch["input"][0, model.config.prompt_length]) == tok.bos_id


def test_max_len_is_capped_by_the_models_positions_and_said_once():
    class Cfg:
        position_bias_max_distance = 777  # a limit no other test uses: the warning is said once per (task, cap)

    class Model:
        config = Cfg()

    task = get_task("kdconv")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert task.effective_max_len(Model()) == 777
        assert task.effective_max_len(Model()) == 777
        assert get_task("lcsts").effective_max_len(Model()) == 256  # under the limit: no cap, nothing said
    said = [str(w.message) for w in seen]
    assert len(said) == 1 and "max_len 1500" in said[0] and "777" in said[0]


# ---- zero-shot: the pretraining prompt --------------------------------------------------------------------------
def test_zero_shot_rows_carry_the_pretraining_prompt(micro):
    model, tok = micro
    P = model.config.prompt_length
    assert TASK_LM == 2
    for zero_shot, task_id in ((False, 1), (True, TASK_LM)):
        fmt = Formatter(model, tok, 256, zero_shot=zero_shot)
        batch, _ = fmt.judge_batch([("春眠不觉晓", "是")])
        assert batch["input"][0, :P].tolist() == list(range(task_id * P, (task_id + 1) * P))
        n = int(batch["length"][0])
        assert set(batch["segment"][0, P:n].tolist()) == {2}  # the LM task's text segment in pretraining
        assert batch["segment"][0, :P].tolist() == [0] * P
    # a choice task scored zero-shot: the "是" logits of rows with prompt ids 2P..3P-1
    task = get_task("ccpm")
    ex = Example("床前明月光\n对应的诗句是：", target="a", options=("疑是地上霜", "春眠不觉晓"), label=0)
    fmt = Formatter(model, tok, 256, zero_shot=True)
    with torch.no_grad():
        ref = task._choice_scores(fmt, model, [ex]).argmax(-1).tolist()
        rows, last = fmt.judge_batch([(ex.input, o) for o in ex.options])
        by_hand = model(**rows)[last][:, fmt.yes_id]
    assert task.predict(model, tok, [ex], zero_shot=True) == ref == [int(by_hand.argmax())]
    # generation zero-shot: cpmant.generate's own layout (the task-2 prompt), tuned: the task-1 prompt
    texts = ["床前明月光", "白日依山尽"]
    settings = {"max_new_tokens": 3, "num_beams": 1}
    assert generate_tuned(model, tok, texts, settings, zero_shot=True) == generate(model, tok, texts, settings)


# ---- nDCG -------------------------------------------------------------------------------------------------------
def test_ndcg_leaves_out_and_counts_queries_without_a_relevant_document(caplog):
    scores = [0.9, 0.8, 0.1, 0.5, 0.4, 0.7, 0.2]
    rel = [0, 2, 1, 0, 0, 1, 0]
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    # a, ranked 0, 2, 1: gains 2^rel - 1 = 0, 3, 1; DCG@3 = 0/log2 2 + 3/log2 3 + 1/log2 4 = 3/log2 3 + 1/2;
    #    ideal 3, 1, 0: IDCG = 3/1 + 1/log2 3
    a = (3 / math.log2(3) + 0.5) / (3 + 1 / math.log2(3))
    # b: both documents irrelevant: IDCG = 0, nDCG is 0/0 -> left out (it used to count as 0 and halve the mean)
    # c: the relevant document is ranked first: 1.0
    values, left_out = M.ndcg_per_query(scores, rel, groups, k=3)
    assert values == pytest.approx({"a": a, "c": 1.0}) and left_out == {"no_relevant": ["b"], "single": []}
    with caplog.at_level("INFO", logger="cpmant.cuge.metrics"):
        assert M.ndcg_at_k(scores, rel, groups, k=3) == pytest.approx(100 * (a + 1.0) / 2)
    assert "1 without a relevant document" in caplog.text
    # linear gain would give a = (2/log2 3 + 1/2) / (2 + 1/log2 3): the exponential one is what is computed
    assert a != pytest.approx((2 / math.log2(3) + 0.5) / (2 + 1 / math.log2(3)))
    assert M.ndcg_at_k([0.3, 0.2], [0, 0], ["q", "q"], k=2) == 0.0  # no query with a relevant document
