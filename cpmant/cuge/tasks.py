"""CPM-Ant's six CUGE tasks: raw formats (as the public releases and CPM-2's fine-tuning code have them), the
text each example becomes, the metric, and the row length (`max_len`: CPM-Live's --tune-maxlen, C3 1024, KdConv 1500,
256 for the others). The expected files per split are in each task's `files`.

- ccpm (choice, F1): train.jsonl, valid.jsonl (or dev.jsonl), test.jsonl (or test_public.jsonl); JSONL rows
  {"translation", "choices": [4 lines], "answer": index}.
- c3 (choice, accuracy): d-train.json + m-train.json (or train.json), d-dev.json + m-dev.json (or valid.json /
  dev.json), d-test.json + m-test.json (or test.json); each a JSON list of
  [[context lines], [{"question", "choice": [...], "answer": text}...], id].
- sogou-log (ranking, nDCG@10/5/1): train.jsonl, valid.jsonl (or dev.jsonl), test.jsonl; JSONL rows
  {"query", "document", "label": relevance grade >= 0, "query_id": optional, default the query text}.
  (No public file format is fixed for it: this JSONL layout is this project's.)
- lcsts (generation, ROUGE-L): train.jsonl, valid.jsonl (or dev.jsonl), test.jsonl; JSONL {"text", "summary"}.
- kdconv (generation, BLEU, Distinct-1/2): train.json, dev.json (or valid.json), test.json, either in the folder
  or in its film/, music/, travel/ subfolders (all read); a JSON list of sessions
  {"messages": [{"message", "attrs": [{"name", "attrname", "attrvalue"}] (optional)}...]}.
- math23k (generation, answer accuracy): train.json, valid.json (or dev.json), test.json; rows
  {"text" (or "original_text"), "equation": "x=...", "ans": optional}, as a JSON list, JSONL, or objects one
  after another (Math23K's own file).
"""

from __future__ import annotations

from typing import Any

from ..errors import a_or_an
from .base import Example, Task, register_task
from .mathexpr import EquationError, evaluate_expression
from .rawfiles import Malformed, read_json_values, read_jsonl

JSONL_FILES = {
    "train": (("train.jsonl",),),
    "valid": (("valid.jsonl",), ("dev.jsonl",)),
    "test": (("test.jsonl",), ("test_public.jsonl",)),
}
KDCONV_DOMAINS = ("film", "music", "travel")
# CPM-Live's --tune-maxlen (its C3 and KdConv tune scripts; 256, base.DEFAULT_MAX_LEN, for the other tasks): long
# passages and KdConv's knowledge need the room; capped by the model's position limit (Task.effective_max_len)
C3_MAX_LEN, KDCONV_MAX_LEN = 1024, 1500
KDCONV_HISTORY_TURNS = 4  # turns of dialogue history kept in a KdConv input (the most recent ones)


def _str(obj: dict, key: str, *alts: str) -> str:
    if not isinstance(obj, dict):
        raise Malformed(f"{a_or_an(type(obj).__name__)}, not a JSON object")
    for k in (key, *alts):
        if k in obj:
            v = obj[k]
            if not isinstance(v, str) or not v.strip():
                raise Malformed(f'"{k}" must be a non-empty string, got {v!r:.40}')
            return v.strip()
    raise Malformed(f'no "{key}" key')


def _options(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(o, str) and o for o in value):
        raise Malformed(f'"{key}" must be a list of at least two non-empty strings')
    return tuple(value)


# ---- CCPM -------------------------------------------------------------------------------------------------------
def ccpm_input(translation: str) -> str:
    return f"{translation}\n对应的诗句是："


def parse_ccpm(obj: Any) -> list[Example]:
    translation = _str(obj, "translation")
    choices = _options(obj.get("choices"), "choices")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise Malformed(f'"answer" must be an index into "choices" (0..{len(choices) - 1}), got {answer!r}')
    return [Example(ccpm_input(translation), target=choices[answer], options=choices, label=answer)]


# CPM-Live's own scripts tuned CCPM as generation (task_config.py); CUGE scores it as a 4-way choice, done here the
# way CPM-Live scores its choice tasks (C3): "是" after "[是否正确]", softmax over the options.
@register_task("ccpm")
def ccpm() -> Task:
    return Task("ccpm", "choice", "f1", ["f1", "accuracy"], JSONL_FILES, parse_ccpm, read_jsonl,
                description="CCPM: classical poetry matching, 4 choices (macro-F1 over answer positions)",
                dir_names=("CCPM",), data_format='JSONL {"translation", "choices": [4 lines], "answer": index}')


# ---- C3 ---------------------------------------------------------------------------------------------------------
def c3_input(context: str, question: str) -> str:
    return f"{context}\n问题：{question}\n答案："


def parse_c3(obj: Any) -> list[Example]:
    if not isinstance(obj, list) or len(obj) < 2 or not isinstance(obj[0], list) or not isinstance(obj[1], list):
        raise Malformed("a C3 row is [[context lines], [questions], id]")
    if not all(isinstance(s, str) for s in obj[0]):
        raise Malformed("the context must be a list of strings")
    context = "\n".join(s.strip() for s in obj[0])
    out = []
    for q in obj[1]:
        question = _str(q, "question")
        choices = _options(q.get("choice"), "choice")
        answer = q.get("answer")
        if answer not in choices:
            raise Malformed(f'"answer" {answer!r:.30} is not one of "choice"')
        out.append(Example(c3_input(context, question), target=answer, options=choices,
                           label=choices.index(answer)))
    if not out:
        raise Malformed("no questions")
    return out


@register_task("c3")
def c3() -> Task:
    files = {
        "train": (("d-train.json", "m-train.json"), ("train.json",)),
        "valid": (("d-dev.json", "m-dev.json"), ("valid.json",), ("dev.json",)),
        "test": (("d-test.json", "m-test.json"), ("test.json",)),
    }
    # C3 questions have 2-4 choices: a batch may mix counts (missing options score -inf in the softmax)
    return Task("c3", "choice", "accuracy", ["accuracy"], files, parse_c3, read_json_values,
                description="C3: multiple-choice reading comprehension (accuracy)", dir_names=("C3",),
                max_len=C3_MAX_LEN,
                data_format='JSON list of [[context lines], [{"question", "choice": [...], "answer"}], id]')


# ---- Sogou-Log ---------------------------------------------------------------------------------------------------
def sogou_input(query: str, document: str) -> str:
    return f"查询：{query}\n文档：{document}\n相关："


def parse_sogou(obj: Any) -> list[Example]:
    query, document = _str(obj, "query"), _str(obj, "document", "doc", "title")
    label = obj.get("label", obj.get("relevance"))
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise Malformed(f'"label" must be a relevance grade (an integer >= 0), got {label!r}')
    group = obj.get("query_id", obj.get("qid", query))
    return [Example(sogou_input(query, document), label=label, group=str(group))]


@register_task("sogou-log")
def sogou_log() -> Task:
    return Task("sogou-log", "ranking", "ndcg_10", ["ndcg_10", "ndcg_5", "ndcg_1"], JSONL_FILES, parse_sogou,
                read_jsonl, description="Sogou-Log: query-document relevance ranking (nDCG@k per query)",
                dir_names=("Sogou-Log", "sogou_log", "SogouLog"),
                data_format='JSONL {"query", "document", "label": grade >= 0, "query_id" (optional)}')


# ---- LCSTS ------------------------------------------------------------------------------------------------------
def lcsts_input(text: str) -> str:
    return f"{text}\n摘要："


def parse_lcsts(obj: Any) -> list[Example]:
    return [Example(lcsts_input(_str(obj, "text")), target=_str(obj, "summary"))]


@register_task("lcsts")
def lcsts() -> Task:
    return Task("lcsts", "generation", "rouge_l", ["rouge_l"], JSONL_FILES, parse_lcsts, read_jsonl,
                description="LCSTS: short-text summarisation (ROUGE-L on characters)", dir_names=("LCSTS",),
                max_new_tokens=32, data_format='JSONL {"text", "summary"}')


# ---- KdConv -----------------------------------------------------------------------------------------------------
def _knowledge(attrs: Any) -> str:
    if attrs is None:
        return ""
    if not isinstance(attrs, list):
        raise Malformed('"attrs" must be a list of {"name", "attrname", "attrvalue"}')
    parts = []
    for a in attrs:
        if not isinstance(a, dict):
            raise Malformed('each of "attrs" must be an object')
        triple = [str(a.get(k, "")).strip() for k in ("name", "attrname", "attrvalue")]
        parts.append(" ".join(t for t in triple if t))
    return "；".join(p for p in parts if p)


def kdconv_input(history: list[str], knowledge: str) -> str:
    dialog = "\n".join(history[-KDCONV_HISTORY_TURNS:])
    return (f"知识：{knowledge}\n" if knowledge else "") + f"对话：\n{dialog}\n回复："


def parse_kdconv(obj: Any) -> list[Example]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise Malformed('a KdConv session is an object with "messages": [{"message", "attrs"}...]')
    msgs = obj["messages"]
    texts = [_str(m, "message") for m in msgs]
    if len(texts) < 2:
        raise Malformed("a session needs at least two messages")
    # one example per response turn: the history before it, and the knowledge its message carries
    return [Example(kdconv_input(texts[:i], _knowledge(msgs[i].get("attrs"))), target=texts[i])
            for i in range(1, len(texts))]


@register_task("kdconv")
def kdconv() -> Task:
    def alternatives(*names: str) -> tuple[tuple[str, ...], ...]:
        return tuple((n,) for n in names) + tuple(tuple(f"{d}/{n}" for d in KDCONV_DOMAINS) for n in names)

    files = {"train": alternatives("train.json"), "valid": alternatives("dev.json", "valid.json"),
             "test": alternatives("test.json")}
    return Task("kdconv", "generation", "bleu", ["bleu", "distinct1", "distinct2"], files, parse_kdconv,
                read_json_values, description="KdConv: knowledge-grounded dialogue (BLEU, Distinct-1/2)",
                dir_names=("KdConv",), max_new_tokens=32, max_len=KDCONV_MAX_LEN,
                data_format='JSON list of sessions {"messages": [{"message", "attrs": [{"name", "attrname", '
                            '"attrvalue"}] (optional)}]}')


# ---- Math23K ----------------------------------------------------------------------------------------------------
def math23k_input(text: str) -> str:
    return f"{text}\n方程："


def parse_math23k(obj: Any) -> list[Example]:
    text = _str(obj, "text", "original_text", "segmented_text")
    if "original_text" not in obj and "text" not in obj:
        text = text.replace(" ", "")  # segmented_text is space-separated words
    equation = _str(obj, "equation").replace(" ", "")
    try:
        value = evaluate_expression(equation)
    except EquationError as e:
        raise Malformed(f'"equation" {equation!r:.40} cannot be evaluated: {e}') from None
    ans = obj.get("ans")
    if ans is not None and str(ans).strip():
        try:
            evaluate_expression(str(ans))
        except EquationError as e:
            raise Malformed(f'"ans" {ans!r:.30} is not a number: {e}') from None
    # the gold answer is the gold equation's exact value (as the usual Math23K evaluation computes it): "ans" may be
    # a rounded decimal (0.33 for 1/3), which the 1e-4 tolerance of the metric would call wrong for x=1/3
    return [Example(math23k_input(text), target=equation, answer=value)]


@register_task("math23k")
def math23k() -> Task:
    files = {"train": (("train.json",),), "valid": (("valid.json",), ("dev.json",)), "test": (("test.json",),)}
    return Task("math23k", "generation", "answer_accuracy", ["answer_accuracy"], files, parse_math23k,
                read_json_values, description="Math23K: math word problems to equations (answer accuracy)",
                dir_names=("Math23K", "math23K"), max_new_tokens=32,
                data_format='JSON {"text", "equation": "x=...", "ans"} rows (a list, JSONL, or one after another)')
