"""Demo tasks (built from the fixture corpus: deterministic by seed, disjoint splits, in the CUGE raw formats) and
CPM-Ant's fine-tuning format on a micro model: training_loss equals an unbatched reference computed by hand from
CPM-Live's rules (task-1 prompt, segment 2, target non-context; "是" after "[是否正确]"), evaluate returns the
task's metrics, and a few steps of tuning lower the loss."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import micro_lm
from cpmant.cuge import DemoTask, build_demo_task, evaluate_expression, get_task
from cpmant.cuge.formatting import TuningPrompt, generate_tuned
from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "fixtures" / "cuge"
SMALL = (12, 4, 4)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("name", ["demo-ccpm", "demo-c3", "demo-lcsts", "demo-math23k"])
def test_demo_build_is_deterministic_and_in_the_cuge_format(name, fixture_corpus, tmp_path):
    a = build_demo_task(name, fixture_corpus, tmp_path / "a", seed=3, sizes=SMALL)
    b = build_demo_task(name, fixture_corpus, tmp_path / "b", seed=3, sizes=SMALL)
    c = build_demo_task(name, fixture_corpus, tmp_path / "c", seed=4, sizes=SMALL)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)
    manifest = json.loads((a / "demo.json").read_text())
    assert manifest["seed"] == 3 and "not CUGE scores" in manifest["note"]
    demo = get_task(name)
    assert demo.is_demo and isinstance(demo, DemoTask)
    mirrored = get_task(manifest["format"])
    splits = {}
    for split in ("train", "valid", "test"):
        ex = demo.load(split, a)
        assert ex == mirrored.load(split, a)  # the CUGE task's own loader reads the demo files
        assert len(ex) == manifest["counts"][split] >= 1 and ex.malformed == 0
        splits[split] = {e.input for e in ex}
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["valid"])
    if name != "demo-math23k":  # the fixture corpus has fewer poems than asked for: sizes shrink
        assert sum(manifest["counts"].values()) <= sum(SMALL)
    else:
        assert manifest["counts"] == dict(zip(("train", "valid", "test"), SMALL))


def test_demo_contents(fixture_corpus, tmp_path):
    ccpm = get_task("demo-ccpm").load("train", build_demo_task("demo-ccpm", fixture_corpus, tmp_path / "p",
                                                                sizes=SMALL))
    lines = (fixture_corpus / "poems.txt").read_text(encoding="utf-8")
    corpus = lines + (fixture_corpus / "sayings.jsonl").read_text(encoding="utf-8")
    for ex in ccpm:  # the right option follows the given line in the corpus; 4 options of equal length
        first = ex.input.split("\n")[0]
        assert f"{first}，{ex.target}" in corpus
        assert len(ex.options) == 4 and len(set(ex.options)) == 4 and {len(o) for o in ex.options} == {len(first)}
    lcsts = get_task("demo-lcsts").load("test", build_demo_task("demo-lcsts", fixture_corpus, tmp_path / "l"))
    assert all(ex.target in lines for ex in lcsts)  # titles of the fixture poems
    math = get_task("demo-math23k").load("train", build_demo_task("demo-math23k", None, tmp_path / "m"))
    assert len(math) == 200
    assert all(evaluate_expression(ex.target) == pytest.approx(ex.answer) for ex in math)
    assert any("%" in ex.target for ex in math) and any("(1/" in ex.target for ex in math)


def test_demo_load_builds_under_cpmant_home(fixture_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    task = get_task("demo-lcsts").with_seed(7, SMALL)
    ex = task.load("valid", fixture_corpus)
    built = list((tmp_path / "home" / "cuge").iterdir())
    assert len(built) == 1 and built[0].name.startswith("demo-lcsts-7-") and built[0].name.endswith("-12x4x4")
    assert (built[0] / "demo.json").is_file() and ex.files == (str(built[0] / "valid.jsonl"),)
    stamp = (built[0] / "demo.json").stat().st_mtime_ns
    assert task.load("valid", fixture_corpus) == ex and (built[0] / "demo.json").stat().st_mtime_ns == stamp
    with pytest.raises(CpmantError, match="does not exist"):
        task.load("train", tmp_path / "no-corpus")


# ---- CPM-Ant's fine-tuning format on a micro model -------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(fixture_corpus, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = micro_lm(fixture_corpus, tmp_path_factory.mktemp("vocab"))
    yield model, tok
    torch.set_num_threads(before)


def _row(model, tok, text_ids, n_context):
    """One unpadded CPM-Live tuning row (task-1 prompt, segment 2) -> logits (L, V)."""
    P = model.config.prompt_length
    ids = list(range(P, 2 * P)) + text_ids
    L = len(ids)
    context = torch.tensor([True] * (P + n_context) + [False] * (len(text_ids) - n_context))
    segment = torch.tensor([0] * P + [2] * len(text_ids))
    return model(input=torch.tensor([ids]), length=torch.tensor([L]), context=context[None],
                 position=torch.arange(L)[None], segment=segment[None], span=torch.zeros(1, L, dtype=torch.long))[0]


def _enc(tok, text):
    return [i for i in tok.encode(text) if i != tok.unk_id]


def test_generation_loss_matches_unbatched_reference(micro):
    model, tok = micro
    task = get_task("lcsts")
    examples = task.load("train", DATA / "lcsts")  # different lengths: the batch is padded
    total, count = 0.0, 0
    for ex in examples:
        inp = [tok.bos_id] + _enc(tok, ex.input)
        tgt = _enc(tok, ex.target) + [tok.eos_id]
        logits = _row(model, tok, inp + tgt, len(inp))
        P = model.config.prompt_length
        pos = torch.arange(P + len(inp) - 1, P + len(inp) + len(tgt) - 1)  # predicts each target token
        total += F.cross_entropy(logits[pos], torch.tensor(tgt), reduction="sum").item()
        count += len(tgt)
    loss = task.training_loss(model, tok, examples)
    assert loss.requires_grad and loss.item() == pytest.approx(total / count, rel=1e-5)


def test_choice_and_ranking_losses_match_unbatched_reference(micro):
    model, tok = micro
    yes = _enc(tok, "是")[0]
    judge = _enc(tok, "[是否正确]")
    task = get_task("c3")
    examples = task.load("train", DATA / "c3")  # 4, 3, 4 and 2 options in one batch
    ref = 0.0
    scores = []
    for ex in examples:
        s = torch.stack([_row(model, tok, ids, len(ids))[-1, yes] for ids in
                         ([tok.bos_id] + _enc(tok, ex.input) + _enc(tok, o) + judge for o in ex.options)])
        scores.append(int(s.argmax()))
        ref += F.cross_entropy(s[None], torch.tensor([ex.label])).item()
    assert task.training_loss(model, tok, examples).item() == pytest.approx(ref / len(examples), rel=1e-5)
    metrics = task.evaluate(model, tok, examples, batch_size=3)  # batches of mixed option counts
    assert metrics == {"accuracy": pytest.approx(100 * sum(p == e.label for p, e in zip(scores, examples)) / 4)}

    task = get_task("sogou-log")
    examples = task.load("train", DATA / "sogou-log")
    ref = 0.0
    for ex in examples:
        ids = [tok.bos_id] + _enc(tok, ex.input) + judge
        logp = torch.log_softmax(_row(model, tok, ids, len(ids))[-1], -1)[yes]
        ref += -(logp if ex.label > 0 else torch.log1p(-logp.exp())).item()
    assert task.training_loss(model, tok, examples).item() == pytest.approx(ref / len(examples), rel=1e-4)
    m = task.evaluate(model, tok, examples)
    assert set(m) == {"ndcg_10", "ndcg_5", "ndcg_1"} and all(0 <= v <= 100 for v in m.values())


def test_generation_uses_the_tuning_prompt(micro):
    model, tok = micro
    texts = ["床前明月光", "春眠不觉晓，处处闻啼鸟", "白日依山尽"]
    expected = []
    for text in texts:
        ids = [tok.bos_id] + _enc(tok, text)
        logits = _row(model, tok, ids, len(ids))[-1].clone()
        banned = [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.newline_id, tok.mask_id, tok.sep_id]
        logits[banned] = float("-inf")  # the first step's bans
        expected.append(tok.decode([int(logits.argmax())]))
    assert generate_tuned(model, tok, texts, {"max_new_tokens": 1}) == expected  # batched, left-padded

    class Recorder(TuningPrompt):  # what the model's first inference call receives, through cpmant.generate
        def __init__(self, model):
            super().__init__(model, 0)
            self.prompts = []

        def inference(self, input, *args, past_key_values=None, **kwargs):
            if past_key_values is None:
                self.prompts.append(input[:, : self.config.prompt_length].clone())
            return self.model.inference(input, *args, past_key_values=past_key_values, **kwargs)

    spy = Recorder(model)
    generate_tuned(spy, tok, texts, {"max_new_tokens": 2})
    P = model.config.prompt_length
    assert len(spy.prompts) == 1 and spy.prompts[0].tolist() == [list(range(P, 2 * P))] * 3  # task 1, not 2


def test_evaluate_generation_tasks_and_tuning_lowers_the_loss(micro, fixture_corpus):
    model, tok = micro
    for name in ("kdconv", "math23k"):
        task = get_task(name)
        ex = task.load("test", DATA / name)
        m = task.evaluate(model, tok, ex, generation={"max_new_tokens": 3})
        assert set(m) == set(task.metrics) and all(0 <= v <= 100 for v in m.values())
    task = get_task("demo-ccpm").with_seed(0, SMALL)
    train = task.load("train", fixture_corpus)[:4]
    m2 = copy.deepcopy(model)  # the module's model is shared: tune a copy
    opt = torch.optim.Adam(m2.parameters(), lr=1e-2)
    first = task.training_loss(m2, tok, train)
    for _ in range(6):
        loss = task.training_loss(m2, tok, train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task.training_loss(m2, tok, train).item() < 0.5 * first.item()


def _repeating_corpus(fixture_corpus, dest: Path) -> Path:
    """The fixture poems plus what fortunes-zh has too: each poem again with other punctuation and title (the
    corpus' whitespace dedup keeps both), and a poem that opens with a fixture poem's first couplet."""
    poems = [p.split("\n") for p in (fixture_corpus / "poems.txt").read_text(encoding="utf-8").strip().split("\n\n")]
    docs = ["\n".join(p) for p in poems]
    for i, (title, body) in enumerate(poems):
        docs.append(f"{title}又\n{body.replace('，', ',').replace('。', '.')}")
        first = body.split("。")[0]
        second = "，".join(c[::-1] for c in body.split("。")[1].split("，"))  # a couplet of its own
        docs.append(f"{title}续\n{first}。{second}。")
    dest.mkdir()
    (dest / "poems.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return dest


def test_demo_splits_share_no_input_even_when_the_corpus_repeats_poems(fixture_corpus, tmp_path):
    import re

    corpus = _repeating_corpus(fixture_corpus, tmp_path / "corpus")
    key = {"demo-ccpm": lambda e: e.input, "demo-lcsts": lambda e: e.input,
           "demo-c3": lambda e: e.input.split("\n问题：")[0]}  # c3: the poem, whatever the question
    for name, k in key.items():
        for seed in range(3):
            d = build_demo_task(name, corpus, tmp_path / f"{name}-{seed}", seed=seed, sizes=(12, 6, 6))
            split = {s: [re.sub(r"[\W_]+", "", k(e)) for e in get_task(name).load(s, d)]
                     for s in ("train", "valid", "test")}
            for s, keys in split.items():
                assert len(keys) == len(set(keys)), (name, seed, s)  # no input twice
            assert not set(split["train"]) & (set(split["valid"]) | set(split["test"])), (name, seed)
            assert not set(split["valid"]) & set(split["test"]), (name, seed)
