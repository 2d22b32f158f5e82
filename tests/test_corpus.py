"""Corpus reading, cleaning, dedup and split on small fixtures; the default corpus (fortunes-zh) when apt works."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cpmant.corpus import MARKER, clean_text, fetch_fortunes_zh, load_corpus
from cpmant.errors import CpmantError

pytestmark = pytest.mark.unit

TANG = (
    "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n"
    "%\n其一\n\n白日依山尽，黄河入海流。\n%\n%\n\x1b[;\x1b[34;1m登鹳雀楼\x1b[m\n"
)
TXT = "春眠不觉晓，处处闻啼鸟。  \r\n夜来风雨声，花落知多少。\n\n\n\n白日依山尽，黄河入海流。\n%\n欲穷千里目，更上一层楼。\n\n学而时习之，不亦说乎？\n"
JSONL = [
    {"text": "学而时习之，不亦说乎？"},  # the same document as in a.txt: dropped whole
    None,  # a blank line: skipped
    {"content": "有朋自远方来，不亦乐乎？\n\n白日依山尽，黄河入海流。"},  # its second paragraph is a duplicate
    {"text": "白日依山尽，黄河入海流。\n\n欲穷千里目，更上一层楼。"},  # both paragraphs seen: emptied
    {"text": "人不知而不愠，不亦君子乎？"},
]
EXPECTED = [
    "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
    "白日依山尽，黄河入海流。",
    "欲穷千里目，更上一层楼。",
    "学而时习之，不亦说乎？",
    "有朋自远方来，不亦乐乎？",
    "人不知而不愠，不亦君子乎？",
    "《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
    "其一",  # a short paragraph is never a duplicate; 白日依山尽 after it is
    "登鹳雀楼",
]


def write_fixture(root: Path) -> Path:
    (root / "fortunes").mkdir(parents=True)
    (root / "a.txt").write_bytes(TXT.encode())
    (root / "b.jsonl").write_text("\n".join("" if o is None else json.dumps(o, ensure_ascii=False) for o in JSONL))
    (root / "fortunes" / "tang").write_text(TANG)
    (root / "README").write_text("not a corpus file: no % line\n")  # ignored
    (root / "notes.md").write_text("# ignored\n")
    (root / ".hidden.txt").write_text("隐藏的文件不算语料。\n")
    return root


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "mini")


def all_docs(c) -> list[str]:
    order = {d: i for i, d in enumerate(EXPECTED)}
    return sorted(c.train + c.valid, key=order.__getitem__)


def test_fixture_documents_cleaned_split_and_deduplicated(corpus_dir: Path):
    c = load_corpus(corpus_dir, valid_fraction=0.3, seed=0)
    assert c.name == "mini"
    assert all_docs(c) == EXPECTED  # ANSI gone, \r\n and trailing spaces normalised, % and blank lines split
    assert not any("\x1b" in d or "[m" in d for d in c.train + c.valid)
    s = c.stats
    assert s["files"] == 3 and s["file_names"] == ["a.txt", "b.jsonl", "fortunes/tang"]
    assert s["ignored_files"] == 2  # README (no % line) and notes.md; hidden files are not even counted
    assert s["raw_documents"] == 12 and s["documents"] == 9
    assert s["empty_documents"] == 1 and s["duplicate_documents"] == 1
    assert s["duplicates_dropped"] == 4 and s["documents_emptied"] == 1
    assert s["chars"] == sum(map(len, EXPECTED))
    assert s["train_documents"] + s["valid_documents"] == 9 and s["valid_documents"] >= 1


def test_clean_text_keeps_chinese_punctuation():
    assert clean_text("a\tb\xa0c\x07d  \r\n\n\n\ne\u3000f，１２。\n") == "a b cd\n\ne\u3000f，１２。"
    assert clean_text("\x1b[33m    -- 李白\x1b[32m《静夜思》\x1b[m") == "    -- 李白《静夜思》"


def test_sha256_and_split_are_deterministic(corpus_dir: Path):
    shutil.copytree(corpus_dir, corpus_dir.parent / "before")
    a, b = load_corpus(corpus_dir), load_corpus(corpus_dir)
    assert a == b and a.sha256 == b.sha256 and len(a.sha256) == 64
    assert a.valid and a.train  # 9 docs at 5%: the split still puts one in valid
    assert load_corpus(corpus_dir, seed=1).sha256 != a.sha256
    assert load_corpus(corpus_dir, valid_fraction=0.5).sha256 != a.sha256
    # More content: a new hash, and the documents already there keep their side (hash split).
    (corpus_dir / "c.txt").write_text("\n\n".join(f"第{i}篇新的文档，内容各不相同。" for i in range(40)))
    c = load_corpus(corpus_dir)
    assert c.sha256 != a.sha256 and c.stats["documents"] == 49
    before, after = load_corpus(corpus_dir.parent / "before", 0.3), load_corpus(corpus_dir, 0.3)
    assert before.valid and set(before.valid) <= set(after.valid) and set(before.train) <= set(after.train)


def test_two_documents_give_nonempty_train_and_valid(tmp_path: Path):
    (tmp_path / "x.txt").write_text("第一篇文档。\n\n第二篇文档。\n")
    for frac in (0.01, 0.99):
        c = load_corpus(tmp_path, valid_fraction=frac)
        assert len(c.train) == 1 and len(c.valid) == 1


def fix_of(excinfo) -> str:
    return str(excinfo.value).split("fix:", 1)[1]


def test_missing_folder(tmp_path: Path):
    with pytest.raises(CpmantError, match="does not exist") as e:
        load_corpus(tmp_path / "nope")
    assert "--corpus" in fix_of(e)


def test_folder_without_corpus_files(tmp_path: Path):
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "LICENSE").write_text("no percent lines here")
    with pytest.raises(CpmantError, match="no corpus files") as e:
        load_corpus(tmp_path)
    assert ".txt" in fix_of(e) and ".jsonl" in fix_of(e)


def test_all_files_empty(tmp_path: Path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("\n  \n%\n\n")
    (tmp_path / "c.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(CpmantError, match="empty") as e:
        load_corpus(tmp_path)
    assert "UTF-8 text" in fix_of(e)


def test_non_utf8_file_names_file_and_offset(tmp_path: Path):
    (tmp_path / "good.txt").write_text("好的文本。")
    (tmp_path / "gbk.txt").write_bytes(b"ab" + "中文".encode("gb18030"))
    with pytest.raises(CpmantError, match=r"gbk\.txt is not UTF-8: byte 2") as e:
        load_corpus(tmp_path)
    assert "iconv -f GB18030 -t UTF-8" in fix_of(e) and "remove" in fix_of(e)


@pytest.mark.parametrize(
    "line, problem",
    [('{"text": "ok"', "Expecting"), ('["a list"]', "not a JSON object"), ('{"title": "x"}', 'no "text"'),
     ('{"text": 3}', '"text" is a int')],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, problem: str):
    (tmp_path / "d.jsonl").write_text('{"text": "第一行没问题。"}\n\n' + line + "\n")
    with pytest.raises(CpmantError, match=r"d\.jsonl:3") as e:
        load_corpus(tmp_path)
    assert problem in e.value.problem and '"text"' in fix_of(e)


def test_bad_valid_fraction(corpus_dir: Path):
    for frac in (0.0, 1.0, -0.1):
        with pytest.raises(CpmantError, match="valid_fraction") as e:
            load_corpus(corpus_dir, valid_fraction=frac)
        assert "0.05" in fix_of(e)


def stub_tools(bin_dir: Path, apt_script: str) -> None:
    bin_dir.mkdir()
    for name, body in (("apt-get", apt_script), ("dpkg", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


def test_fetch_without_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CpmantError, match="apt-get") as e:
        fetch_fortunes_zh(tmp_path / "dest")
    assert "--corpus DIR" in fix_of(e)


def test_fetch_with_missing_package_lists_says_apt_get_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stub_tools(tmp_path / "bin", "echo 'E: Unable to locate package fortunes-zh' >&2; exit 100")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(CpmantError, match="package lists") as e:
        fetch_fortunes_zh(tmp_path / "dest")
    assert "apt-get update" in fix_of(e) and "--corpus DIR" in fix_of(e)
    assert not (tmp_path / "dest" / MARKER).exists()


def test_fetch_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    stub_tools(tmp_path / "bin", "echo 'E: Failed to fetch http://deb.debian.org/...' >&2; exit 100")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(CpmantError, match="Failed to fetch") as e:
        fetch_fortunes_zh(tmp_path / "dest")
    assert "network" in fix_of(e) and "--corpus DIR" in fix_of(e)


def test_fetch_is_a_noop_once_the_marker_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / MARKER).write_text("{}")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # would fail if it tried to download
    assert fetch_fortunes_zh(dest) == dest


@pytest.fixture(scope="session")
def fortunes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fortunes-zh fetched once per session (or kept in $CPMANT_TEST_FORTUNES_DIR across sessions)."""
    dest = Path(os.environ.get("CPMANT_TEST_FORTUNES_DIR") or tmp_path_factory.mktemp("corpora") / "fortunes-zh")
    try:
        return fetch_fortunes_zh(dest)
    except CpmantError as e:
        pytest.skip(f"cannot fetch the default corpus fortunes-zh with apt-get download: {e}")


def test_default_corpus_fetched_and_loaded(fortunes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    names = sorted(p.name for p in fortunes_dir.iterdir())
    assert names == [MARKER, "chinese", "copyright", "song100", "tang300"]  # no .dat files
    assert "GPL-3" in (fortunes_dir / "copyright").read_text()
    marker = json.loads((fortunes_dir / MARKER).read_text())
    assert marker["package"] == "fortunes-zh" and marker["deb"].endswith(".deb")
    stamp = (fortunes_dir / MARKER).stat().st_mtime_ns
    assert fetch_fortunes_zh(fortunes_dir) == fortunes_dir and (fortunes_dir / MARKER).stat().st_mtime_ns == stamp

    # load_corpus(None) reads CPMANT_HOME/corpora/fortunes-zh; a copy there needs no download.
    shutil.copytree(fortunes_dir, tmp_path / "home" / "corpora" / "fortunes-zh")
    monkeypatch.setenv("CPMANT_HOME", str(tmp_path / "home"))
    c = load_corpus()
    assert c.name == "fortunes-zh" and c == load_corpus(fortunes_dir)
    s = c.stats
    assert s["files"] == 3 and s["ignored_files"] == 1  # copyright has no % line
    assert s["documents"] > 5000 and s["chars"] > 800_000 and s["duplicates_dropped"] > 100
    assert 0.03 < s["valid_documents"] / s["documents"] < 0.07
    assert not any("\x1b" in d for d in c.train + c.valid)
    assert any("床前明月光" in d for d in c.train + c.valid)


def _one_document_corpora(root: Path, fixture_corpus: Path) -> dict[str, Path]:
    """The fixture poems as one long line, and as one paragraph (no blank line)."""
    lines = [ln for ln in (fixture_corpus / "poems.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = {}
    for name, text in (("one-line", "".join(lines)), ("one-paragraph", "\n".join(lines))):
        (root / name).mkdir(parents=True)
        (root / name / "a.txt").write_text(text + "\n", encoding="utf-8")
        out[name] = root / name
    return out


def test_one_document_is_split_by_chunks(tmp_path: Path, fixture_corpus: Path):
    for name, path in _one_document_corpora(tmp_path, fixture_corpus).items():
        c = load_corpus(path)
        assert c.stats["documents"] == 1 and c.stats["split_by"] == "chunks", name
        assert c.valid and c.train, name
        assert all(len(d) <= 128 for d in c.train + c.valid), name
        # nothing lost: the chunks are the document (cut at line ends or inside a long line)
        text = (path / "a.txt").read_text(encoding="utf-8").replace("\n", "")
        assert sum(len(d.replace("\n", "")) for d in c.train + c.valid) == len(text), name
        assert c == load_corpus(path) and c.sha256 != load_corpus(path, seed=1).sha256


@pytest.mark.parametrize("name", ["one-line", "one-paragraph"])
def test_one_document_corpus_pretrains(tmp_path: Path, fixture_corpus: Path, micro_pretrain_cfg, name: str):
    from cpmant.training.loop import pretrain

    path = _one_document_corpora(tmp_path / "corpora", fixture_corpus)[name]
    res = pretrain(micro_pretrain_cfg(corpus=str(path), max_steps=2, save_interval=2, eval_interval=2,
                                      ), progress=False)
    assert res.data["valid_docs"] >= 1 and res.valid_loss_end > 0


def test_data_sha256_keeps_the_value_every_existing_version_records():
    """cpmant.data_sha256 is a contract tag on every registered version: the same corpus and split settings hash to
    the value the code has always given (computed with the code of f037be0, before the hashing was gathered in
    cpmant/hashing.py), or every model of an existing home would look trained on another corpus."""
    from cpmant.corpus import corpus_sha256

    assert corpus_sha256(["床前明月光", "疑是地上霜"], 0.1, 0) == \
        "48d2f2c1b5ff1a57306a10faee2156bf744a73d2d30eb0356cd2d8a494d30d86"
    assert corpus_sha256(["床前明月光"], 0.2, 3, split_by="chunks") == \
        "d5419b2b71932bae966c280d3b47acac965a18bc709af1b27c87c7632b6d1357"
