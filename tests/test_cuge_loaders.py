"""CUGE loaders on fixture files in each task's raw format: examples, the registry, data-folder resolution,
malformed rows (counted, warned, fatal over the threshold, naming the file and line)."""

from pathlib import Path

import pytest

from cpmant.cuge import get_task, task_names
from cpmant.cuge import metrics as M
from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "fixtures" / "cuge"
CUGE = ("ccpm", "c3", "sogou-log", "lcsts", "kdconv", "math23k")


def load(task, split, threshold=0.6):
    return get_task(task).load(split, DATA / task, malformed_threshold=threshold)


def test_registry():
    assert set(CUGE + ("demo-ccpm", "demo-c3", "demo-lcsts", "demo-math23k")) <= set(task_names())
    assert task_names(include_demo=False) == CUGE
    kinds = {n: get_task(n).kind for n in CUGE}
    assert kinds == {"ccpm": "choice", "c3": "choice", "sogou-log": "ranking", "lcsts": "generation",
                     "kdconv": "generation", "math23k": "generation"}
    for n in task_names():
        t = get_task(n)
        assert t.primary_metric in t.metrics and t.is_demo == n.startswith("demo-")
    with pytest.raises(CpmantError, match="unknown task 'cmrc'.*ccpm, c3, sogou-log"):
        get_task("cmrc")


def test_ccpm():
    with pytest.warns(UserWarning, match=r"skipped 1 malformed of 5 rows.*train.jsonl:3"):
        train = load("ccpm", "train")
    assert (len(train), train.rows, train.malformed) == (4, 5, 1)
    assert train[0].options == ("床前明月光", "疑是地上霜", "举头望明月", "低头思故乡") and train[0].label == 0
    assert train[1].label == 1 and train[1].target == "春眠不觉晓" and "春天睡醒" in train[1].input
    assert train[0].source == "train.jsonl:1" and train[2].source == "train.jsonl:4"  # relative: hashes travel
    assert [ex.label for ex in load("ccpm", "valid")] == [1, 2]  # a blank line is no row
    assert [ex.label for ex in load("ccpm", "test")] == [0, 2]  # test_public.jsonl, CCPM's own name


def test_c3_reads_d_and_m_files():
    train = load("c3", "train")
    assert len(train) == 4 and train.rows == 3  # two d- documents (3 questions) + one m- document
    assert [ex.label for ex in train] == [1, 1, 0, 1]
    assert train[1].options == ("一百块", "一百五十块", "五十块")  # 3 choices
    assert "女：这件衣服多少钱？" in train[2].input and "他们最可能在哪里？" in train[2].input
    with pytest.warns(UserWarning, match="is not one of"):
        assert len(load("c3", "dev")) == 1  # "dev" means valid; the answer missing from the choices is malformed


def test_sogou_log_groups_and_labels():
    train = load("sogou-log", "train")
    assert [ex.label for ex in train] == [2, 0, 1, 2, 0]
    assert [ex.group for ex in train] == ["q1", "q1", "q1", "唐诗三百首", "唐诗三百首"]  # no query_id: the query
    assert "北京天气" in train[0].input and "北京今天晴" in train[0].input
    assert [ex.label for ex in load("sogou-log", "test")] == [2, 0]  # "0" as a string is accepted
    with pytest.warns(UserWarning, match=r"dev.jsonl:3.*relevance grade"):
        assert len(load("sogou-log", "valid")) == 2


def test_lcsts():
    train = load("lcsts", "train")
    assert [ex.target for ex in train] == ["全市公交下月起免费", "本周末大幅降温", "每天步行有益心脏"]
    assert train[0].input.startswith("今天上午，市政府")


def test_kdconv_one_example_per_response_turn():
    with pytest.warns(UserWarning, match=r"music/train.json:3.*two messages"):
        train = load("kdconv", "train")  # film/ and music/ train.json
    assert len(train) == 4  # film: 3 response turns; music: 1 (+ one malformed session)
    assert [ex.target for ex in train[:3]] == ["看过，是陈凯歌导演的。", "主演是谁？", "张国琼和巩俐。"]
    # the history before the turn, and the knowledge (attrs) of the response turn
    assert "你看过《霸王别姬》吗？" in train[0].input and "霸王别姬 导演 陈凯歌" in train[0].input
    assert "知识" not in train[1].input  # no attrs
    assert "霸王别姬 主演 张国荣；霸王别姬 主演 巩俐" in train[2].input and "主演是谁？" in train[2].input
    assert train[3].source.endswith("music/train.json:2")
    assert load("kdconv", "valid")[0].target == "《活着》不错。"


def test_math23k_formats_and_answers():
    with pytest.warns(UserWarning, match=r"train.json:22.*not JSON"):
        train = load("math23k", "train")  # Math23K's own layout: objects one after another
    assert [ex.answer for ex in train] == [8, 160, 8, 5.5]  # 5(1/2) is a mixed number
    assert train[1].target == "x=200*(1-20%)" and train[3].source.endswith("train.json:27")
    assert [ex.answer for ex in load("math23k", "valid")] == [24, 16]  # a JSON list
    test = load("math23k", "test")  # JSONL; no "ans": the equation's value
    assert [ex.answer for ex in test] == [4, 20]
    rounded = {"text": "1除以3是多少？", "equation": "x=1/3", "ans": "0.33"}  # gold: the equation's exact value
    (ex,) = get_task("math23k").parse(rounded)
    assert ex.answer == pytest.approx(1 / 3, abs=1e-12) and M.math_answer_accuracy(["x=1/3"], [ex.answer]) == 100.0


def test_over_threshold_fails_naming_file_and_line():
    with pytest.raises(CpmantError, match=r"1 of 5 rows are malformed \(20.0% > 1%\).*ccpm/train.jsonl:3"):
        get_task("ccpm").load("train", DATA / "ccpm")  # default threshold 1%
    with pytest.raises(CpmantError, match=r"math23k/train.json:22"):
        get_task("math23k").load("train", DATA / "math23k", malformed_threshold=0.1)
    # a broken JSON list cannot be resynchronised: fatal, with the line
    with pytest.raises(CpmantError, match=r"broken/train.json:3: broken JSON list"):
        get_task("math23k").load("train", DATA / "broken")


def test_data_folder_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("CUGE_DATA", raising=False)
    with pytest.raises(CpmantError, match="neither `--data DIR` nor CUGE_DATA") as e:
        get_task("lcsts").load("train")
    assert "train.jsonl" in e.value.fix
    monkeypatch.setenv("CUGE_DATA", str(DATA))
    assert len(get_task("lcsts").load("train")) == 3  # $CUGE_DATA/lcsts
    assert len(get_task("lcsts").load("train", DATA)) == 3  # --data naming the folder of all tasks
    monkeypatch.setenv("CUGE_DATA", str(tmp_path))
    (tmp_path / "LCSTS").mkdir()  # the official name works too
    with pytest.raises(CpmantError, match=r"no train file in .*LCSTS \(expected train: train.jsonl\)"):
        get_task("lcsts").load("train")
    with pytest.raises(CpmantError, match="does not exist"):
        get_task("lcsts").load("train", tmp_path / "nowhere")
    with pytest.raises(CpmantError, match="unknown split 'training'"):
        get_task("lcsts").load("training", DATA / "lcsts")
    with pytest.raises(CpmantError, match="expected valid: d-dev.json\\+m-dev.json or valid.json or dev.json"):
        get_task("c3").load("valid", tmp_path / "LCSTS")


def test_data_sha256_changes_with_content(tmp_path):
    import shutil

    shutil.copytree(DATA / "lcsts", tmp_path / "lcsts")
    task = get_task("lcsts")
    before = task.data_sha256(tmp_path / "lcsts")
    assert before == task.data_sha256(DATA / "lcsts")
    with open(tmp_path / "lcsts" / "valid.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "新的一行", "summary": "新"}\n')
    assert task.data_sha256(tmp_path / "lcsts") != before


def test_deep_nesting_is_a_malformed_row(tmp_path):
    """A Math23K equation with 300 nested parentheses and a JSONL row nested 100k deep were RecursionErrors (8,951
    lines of log): each is now one malformed row, counted like the others."""
    from cpmant.cuge.mathexpr import try_evaluate

    assert try_evaluate("x=" + "(" * 100 + "1" + ")" * 100) == 1.0
    assert try_evaluate("x=" + "(" * 300 + "1" + ")" * 300) is None  # too deep: not an answer, not a crash
    deep = "x=" + "(" * 5000 + "1" + ")" * 5000
    assert try_evaluate(deep) is None
    good = [{"text": f"{i}加{i}等于多少？", "equation": f"x={i}+{i}"} for i in range(1, 5)]
    rows = [__import__("json").dumps(g, ensure_ascii=False) for g in good]
    rows.insert(2, "[" * 100_000 + "]" * 100_000)  # nested 100k deep
    rows.append(__import__("json").dumps({"text": "?", "equation": deep}))  # parses, but its answer cannot
    (tmp_path / "train.jsonl").write_text("\n".join(rows), encoding="utf-8")
    with pytest.warns(UserWarning, match=r"train.jsonl:3: JSON nested too deeply"):
        got = get_task("math23k").load_files([tmp_path / "train.jsonl"], malformed_threshold=0.5)
    assert [ex.answer for ex in got] == [2, 4, 6, 8] and got.malformed == 2
