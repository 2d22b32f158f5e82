"""The tokenizer: vocab building, validation, round trips, parity with transformers' CpmAntTokenizer, encoding."""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cpmant.corpus import fetch_fortunes_zh, load_corpus
from cpmant.encode import encode_documents
from cpmant.errors import CpmantError
from cpmant.tokenizer import MIN_VOCAB_SIZE, SENTINELS, SPECIAL_TOKENS, CPMAntTokenizer, build_vocab, jieba_cut

pytestmark = pytest.mark.unit

TEXTS = [
    "中华人民共和国成立了。我们热爱中华人民共和国。",
    "北京大学和清华大学都在北京。我们在北京大学读书。",
    "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "Debian 是一个自由的操作系统，我们使用 Debian 12。",
    "今天天气很好，我们去公园散步。今天是星期天。",
]


def hf_tokenizer(vocab: Path):
    from transformers import CpmAntTokenizer

    return CpmAntTokenizer(str(vocab))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vocab(TEXTS, 200, tmp_path_factory.mktemp("vocab") / "vocab.txt")


def test_build_vocab_layout(small_vocab: Path, tmp_path: Path):
    lines = small_vocab.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 201  # exactly vocab_size lines, each ending in "\n"
    tokens = lines[:-1]
    assert tuple(tokens[:10]) == SPECIAL_TOKENS and tuple(tokens[-59:]) == SENTINELS
    body = tokens[10:-59]
    assert " " not in body and "\n" not in body and len(set(tokens)) == 200
    chars = [t for t in body if len(t) == 1]
    freq = Counter("".join(TEXTS))
    del freq[" "], freq["\n"]
    assert chars == sorted(freq, key=lambda c: (-freq[c], c))  # every character, most frequent first
    words = [t for t in body if len(t) >= 2 and not t.startswith("<unused")]
    assert "我们" in words and "北京大学" in words and "中华人民共和国" in words
    assert body.index(words[0]) > body.index(chars[-1])  # all characters before any word
    # The texts run out of words before 200: fillers that no text can produce keep the size exact.
    assert any(t.startswith("<unused") for t in body)
    again = build_vocab(TEXTS, 200, tmp_path / "v.txt")
    assert again.read_bytes() == small_vocab.read_bytes()  # deterministic


def test_tokenizer_specials_and_round_trip(small_vocab: Path):
    tok = CPMAntTokenizer(small_vocab)
    assert tok.vocab_size == 200 and len(tok.vocab_sha256) == 64
    assert (tok.pad_id, tok.unk_id, tok.mask_id, tok.sep_id) == (0, 1, 2, 3)
    assert (tok.newline_id, tok.space_id, tok.bos_id, tok.eos_id) == (4, 5, 6, 7)
    assert tok.decoder[tok.bos_id] == "<s>" and tok.encoder["\n"] == 4 and tok.encoder[" "] == 5
    assert "</n>" not in tok.encoder and "</_>" not in tok.encoder
    text = "我们在北京大学读书。\n今天 天气很好"
    ids = tok.encode(text)
    assert tok.unk_id not in ids and 4 in ids and 5 in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.tokenize("北京大学") == ["北京大学"]  # the longest vocab match wins
    assert tok.encode("我们吃猫") == [tok.encoder["我们"], tok.unk_id, tok.unk_id]  # 吃, 猫 are not in the vocab
    assert tok.decode(tok.encode("猫")) == "<unk>"
    assert tok.encode("a" * 201) == [tok.unk_id]  # a jieba word over 200 characters is one <unk>


def test_same_ids_as_transformers_on_tricky_text(small_vocab: Path):
    ours, hf = CPMAntTokenizer(small_vocab), hf_tokenizer(small_vocab)
    for text in [*TEXTS, "", "  双空格\t制表\r\n回车", "a" * 201, "Debian12.5% + C++ #1 a-b_c", "</n></_><d>文</d>",
                 "中华人民共和国中华人民共和国中华", "\u3000\u3000全角空格，１２３。"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
    # transformers cuts literal "<s>", "</s>", "<pad>", "<unk>" out as control ids; we keep text as text,
    # which is what transformers does with split_special_tokens=True.
    text = "删除线<s>旧</s>，<unk>"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ours.bos_id not in ours.encode(text) and hf.bos_token_id in hf.encode(text, add_special_tokens=False)


def test_jieba_cut_equals_global_jieba():
    import jieba

    for text in TEXTS:
        assert jieba_cut(text) == list(jieba.cut(text, cut_all=False))


def write_vocab(path: Path, tokens: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def test_bad_vocab_files(small_vocab: Path, tmp_path: Path):
    tokens = small_vocab.read_text(encoding="utf-8").split("\n")[:-1]
    with pytest.raises(CpmantError, match=f"at least {MIN_VOCAB_SIZE}") as e:
        CPMAntTokenizer(write_vocab(tmp_path / "small.txt", tokens[:50]))
    assert "build_vocab" in str(e.value) and "larger vocab_size" in str(e.value)
    swapped = [tokens[1], tokens[0], *tokens[2:]]
    with pytest.raises(CpmantError, match="id 0 is '<unk>', not '<pad>'") as e:
        CPMAntTokenizer(write_vocab(tmp_path / "swapped.txt", swapped))
    assert "build_vocab" in e.value.fix
    with pytest.raises(CpmantError, match="<s0>..<s58>") as e:
        CPMAntTokenizer(write_vocab(tmp_path / "nosentinels.txt", tokens[:-59] + ["x"] * 59))
    assert "build_vocab" in e.value.fix
    with pytest.raises(CpmantError, match="does not exist"):
        CPMAntTokenizer(tmp_path / "missing.txt")


def test_build_vocab_too_small_and_too_many_characters(tmp_path: Path):
    with pytest.raises(CpmantError, match="too small") as e:
        build_vocab(TEXTS, MIN_VOCAB_SIZE - 1, tmp_path / "v.txt")
    assert f">= {MIN_VOCAB_SIZE}" in e.value.fix
    assert not (tmp_path / "v.txt").exists()
    with pytest.warns(UserWarning, match="rarest become <unk>"):
        path = build_vocab(TEXTS, MIN_VOCAB_SIZE + 5, tmp_path / "v.txt")
    tok = CPMAntTokenizer(path)
    assert tok.vocab_size == MIN_VOCAB_SIZE + 5 and tok.unk_id in tok.encode(TEXTS[0])
    assert [p.name for p in tmp_path.iterdir()] == ["v.txt"]  # no temporary file left behind


# ---- the default corpus: parity with transformers on every document, and parallel, cached encoding ----


@pytest.fixture(scope="session")
def fortunes_docs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Every document of fortunes-zh, fetched once per session (or kept in $CPMANT_TEST_FORTUNES_DIR)."""
    dest = Path(os.environ.get("CPMANT_TEST_FORTUNES_DIR") or tmp_path_factory.mktemp("corpora") / "fortunes-zh")
    try:
        corpus = load_corpus(fetch_fortunes_zh(dest))
    except CpmantError as e:
        pytest.skip(f"cannot fetch the default corpus fortunes-zh with apt-get download: {e}")
    return [*corpus.train, *corpus.valid]


@pytest.fixture(scope="session")
def fortunes_vocabs(fortunes_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """6000 (the tiny preset: all characters, no room for words), 1500 (many <unk>), 12000 (words too)."""
    root = tmp_path_factory.mktemp("fortunes-vocab")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 6169 distinct characters do not fit in 1500 or 6000
        return {n: build_vocab(fortunes_docs, n, root / f"vocab-{n}.txt") for n in (6000, 1500, 12000)}


@pytest.mark.parametrize("size", [6000, 1500, 12000])
def test_same_ids_as_transformers_on_the_whole_default_corpus(fortunes_docs, fortunes_vocabs, size):
    ours, hf = CPMAntTokenizer(fortunes_vocabs[size]), hf_tokenizer(fortunes_vocabs[size])
    ids = [ours.encode(d) for d in fortunes_docs]
    ref = [hf.encode(d, add_special_tokens=False) for d in fortunes_docs]
    bad = [i for i, (a, b) in enumerate(zip(ids, ref)) if a != b]
    assert not bad, f"{len(bad)} documents differ, first: {fortunes_docs[bad[0]][:80]!r}"
    n_unk = sum(x.count(ours.unk_id) for x in ids)
    n_multi = sum(len(ours.decoder[i]) > 1 for x in ids for i in x if i > 9)
    if size == 1500:
        assert n_unk > 10_000  # unknown characters are exercised
    if size == 12000:
        assert n_multi > 50_000 and n_unk == 0  # longest match over words is exercised


def test_encode_documents_parallel_equals_serial_and_is_cached(fortunes_docs, fortunes_vocabs, tmp_path: Path):
    docs, vocab = fortunes_docs[:2000], fortunes_vocabs[1500]
    serial = encode_documents(docs, CPMAntTokenizer(vocab), cache_dir=tmp_path / "a", num_workers=1, progress=False)
    t0 = time.perf_counter()
    parallel = encode_documents(docs, vocab, cache_dir=tmp_path / "b", num_workers=2, progress=False)
    first = time.perf_counter() - t0
    assert len(serial) == len(parallel) == len(docs)
    assert all(a.dtype == np.int32 and np.array_equal(a, b) for a, b in zip(serial, parallel))
    tok = CPMAntTokenizer(vocab)
    assert all(1 not in a for a in serial)  # drop_unk=True drops <unk>
    assert [a.tolist() for a in serial[:50]] == [[i for i in tok.encode(d) if i != 1] for d in docs[:50]]
    cached = list((tmp_path / "b").glob("*.npz"))
    assert len(cached) == 1
    with np.load(cached[0], allow_pickle=False) as z:
        assert sorted(z.files) == ["ids", "offsets"] and z["offsets"][-1] == sum(map(len, parallel))
    t0 = time.perf_counter()
    again = encode_documents(docs, vocab, cache_dir=tmp_path / "b", num_workers=2, progress=False)
    assert time.perf_counter() - t0 < first / 5 and len(list((tmp_path / "b").iterdir())) == 1  # a cache hit
    assert all(np.array_equal(a, b) for a, b in zip(again, parallel))
    with_unk = encode_documents(docs, vocab, cache_dir=tmp_path / "b", num_workers=1, drop_unk=False, progress=False)
    assert len(list((tmp_path / "b").glob("*.npz"))) == 2  # other options, other cache entry
    assert sum(map(len, with_unk)) > sum(map(len, serial)) and any(1 in a for a in with_unk)
    assert encode_documents([], vocab, cache_dir=tmp_path / "c", progress=False) == []
    with pytest.raises(CpmantError, match="sequence of str"):
        encode_documents("一个字符串", vocab, cache_dir=tmp_path / "c", progress=False)
