"""Demo tasks: small tasks in the CUGE raw formats, built from the installed corpus (default: Debian's
fortunes-zh; any corpus folder works) and deterministic by seed. They let the tuning stage run on any machine;
their scores are never CUGE scores (`Task.is_demo`).

- demo-ccpm (ccpm's format): a verse line (4-9 Chinese characters); which of 4 lines of the same length
  follows it (the other 3 from other poems).
- demo-c3 (c3's format): a poem as the context; "who wrote it" (where the corpus names authors) or "what is its
  title", 4 choices.
- demo-lcsts (lcsts's format): a poem's text -> its title.
- demo-math23k (math23k's format): templated word problems (小明有3个苹果，又买了5个... -> x=3+5), with
  percentages and fractions; the corpus is not used.

Splits are made at the poem level (a poem's examples stay in one split), and poems that share an example's key
(its input text with punctuation and spaces removed: the corpus repeats poems and lines across documents) are one
group, so no input of valid or test is in train, and no input appears twice; sizes default to 200/200/500
(train/valid/test: test and valid large enough for a 95% interval of about +-4 points on accuracy, the training
set small enough for CPU tuning) and shrink in proportion when the corpus has fewer poems. The default corpus
(fortunes-zh) gives every demo task its full 200/200/500 (about 3,500 ccpm line pairs and 4,100 c3/lcsts poems
are usable); a smaller corpus folder gives less, and demo.json's `counts` say what was reached.
`build_demo_task` writes the raw
files plus `demo.json` (seed, corpus, counts; written last, so its presence marks a complete build).
`task.load(split)` builds once into $CPMANT_HOME/cuge/<name>-<seed>/ from the default corpus, or
$CPMANT_HOME/cuge/<name>-<seed>-<key>/ from a corpus folder passed as data_dir (key: a hash of the folder's path,
file names, sizes and mtimes), with `-<train>x<valid>x<test>` appended for sizes other than the default; a
data_dir that holds a built demo (its demo.json) is read as is.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CpmantError
from ..fsutil import atomic_write_text
from ..hashing import sha256_json
from .base import SPLITS, Examples, Task, normalize_split, register_task
from .tasks import c3 as _c3, ccpm as _ccpm, lcsts as _lcsts, math23k as _math23k

DEMO_VERSION = 3  # bump when the builders change: it is part of demo.json and the folder key
DEFAULT_SIZES = (200, 200, 500)  # train, valid, test
MANIFEST = "demo.json"
MAX_POEM_CHARS = 96  # longer texts are left out of demo-c3 / demo-lcsts (keeps CPU tuning fast)
PAIRS_PER_POEM = 2  # demo-ccpm: at most this many line pairs from one poem

_CJK_LINE = re.compile(r"^[\u4e00-\u9fff]{4,9}$")
_CLAUSE_SPLIT = re.compile(r"[，。？！；：、,.?!;:]")
_PUNCT = re.compile(r"[，。？！；：、,.?!;:“”「」]")
_TITLE_FIELD = re.compile(r"^题目\s*[:：]\s*[《〈](.+?)[》〉]")
_TITLE_LINE = re.compile(r"^[《〈](.+?)[》〉]$")
_AUTHOR_FIELD = re.compile(r"^作者\s*[:：]\s*([^（(\s]+)")
_ATTRIBUTION = re.compile(r"^-{1,2}\s*(.*?)\s*《(.+?)》\s*$")
_SOURCE = re.compile(r"^-{1,2}\s*")
_NON_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class Poem:
    title: str
    author: str
    lines: tuple[str, ...]  # body lines as written (with their punctuation)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    @property
    def clauses(self) -> list[str]:
        return [c.strip() for c in _CLAUSE_SPLIT.split(self.text) if c.strip()]

    @property
    def is_verse(self) -> bool:
        cl = self.clauses
        return len(cl) >= 2 and all(_CJK_LINE.match(c) for c in cl)


def parse_poem(doc: str) -> Poem | None:
    """Title, author and body lines of a corpus document (fortunes-zh's `〈title〉 / 作者：name`, `题目:《title》`,
    `-- author《title》` attributions, or a short first line without punctuation followed by text)."""
    title = author = ""
    body = []
    for raw in doc.split("\n"):
        line = raw.strip().replace("\u3000", "")
        if not line:
            continue
        if m := _TITLE_FIELD.match(line):
            title = m.group(1)
        elif m := _AUTHOR_FIELD.match(line):
            author = m.group(1)
        elif (m := _TITLE_LINE.match(line)) and not body:
            title = m.group(1)
        elif m := _ATTRIBUTION.match(line):
            author, title = author or m.group(1), title or m.group(2)
        elif _SOURCE.match(line) and line.startswith("-"):
            continue
        elif not _PUNCT.search(line):
            if not body and not title and len(line) <= 12:
                title = line
            # else: a section heading such as 其一: not part of the text
        else:
            body.append(line)
    if not body:
        return None
    return Poem(title.strip(), author.strip(), tuple(body))


def corpus_poems(corpus_dir: str | Path | None) -> tuple[list[Poem], str]:
    from ..corpus import load_corpus

    corpus = load_corpus(Path(corpus_dir) if corpus_dir is not None else None)
    poems = [p for p in (parse_poem(d) for d in (*corpus.train, *corpus.valid)) if p is not None]
    return poems, corpus.sha256


# ---- split sizes and assignment -----------------------------------------------------------------------------
def _quota(available: int, sizes: tuple[int, int, int]) -> tuple[int, int, int]:
    """Per split (train, valid, test) how many examples: `sizes`, or less in proportion (valid/test >= 1)."""
    if available < 3:
        raise CpmantError(f"the corpus gives only {available} demo examples (3 needed: one per split)",
                          "use a larger corpus (e.g. the default fortunes-zh)")
    total = sum(sizes)
    if available >= total:
        return sizes
    valid = max(1, available * sizes[1] // total)
    test = max(1, available * sizes[2] // total)
    return available - valid - test, valid, test


def _norm(text: str) -> str:
    """An example's identity: its text without punctuation, symbols or spaces."""
    return _NON_WORD.sub("", text)


def _merge_shared(groups: list[list], key) -> list[list]:
    """Groups that share a row key merged into one (in first-seen order), each key's first row only: two corpus
    documents can hold the same poem or line (fortunes-zh does), and one key must never reach two splits."""
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, g in enumerate(groups):
        for row in g:
            k = key(row)
            if k not in owner:
                owner[k] = i
                continue
            a, b = find(owner[k]), find(i)
            if a != b:
                parent[max(a, b)] = min(a, b)
    merged: dict[int, list] = {}
    seen: set[str] = set()
    for i, g in enumerate(groups):
        rows = merged.setdefault(find(i), [])
        for row in g:
            k = key(row)
            if k not in seen:
                seen.add(k)
                rows.append(row)
    return list(merged.values())


def _assign(groups: list[list], sizes: tuple[int, int, int], rng: random.Random, key=None) -> dict[str, list]:
    """Shuffle the groups (one per poem) and fill test, valid, then train; a group never spans two splits.
    With `key` (row -> str), groups sharing a key are merged first (`_merge_shared`)."""
    if key is not None:
        groups = _merge_shared(groups, key)
    groups = [g for g in groups if g]
    rng.shuffle(groups)
    quota = dict(zip(("train", "valid", "test"), _quota(sum(len(g) for g in groups), sizes)))
    out: dict[str, list] = {s: [] for s in SPLITS}
    order = ["test", "valid", "train"]
    k = 0
    for g in groups:
        while k < len(order) and len(out[order[k]]) >= quota[order[k]]:
            k += 1
        if k == len(order):
            break
        s = order[k]
        out[s].extend(g[: quota[s] - len(out[s])])
    for s in SPLITS:
        rng.shuffle(out[s])
    return out


def _distractors(rng: random.Random, pool: list[str], exclude: set[str], n: int = 3) -> list[str] | None:
    """n distinct items of `pool` (sorted, unique) not in `exclude`, or None when there are too few. Sampling
    n + |exclude in pool| items leaves at least n that are not excluded."""
    k = len(exclude.intersection(pool))
    if len(pool) - k < n:
        return None
    return [x for x in rng.sample(pool, n + k) if x not in exclude][:n]


def _choices(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


# ---- builders (each returns {split: [raw rows]}) -------------------------------------------------------------
def _build_ccpm(poems: list[Poem], sizes, rng: random.Random) -> dict[str, list]:
    verses = [p for p in poems if p.is_verse]
    by_len_sets: dict[int, set[str]] = {}
    for p in verses:
        for c in p.clauses:
            by_len_sets.setdefault(len(c), set()).add(c)
    by_len = {n: sorted(v) for n, v in by_len_sets.items()}
    groups = []
    for i, p in enumerate(verses):
        cl = p.clauses
        pairs = [(cl[j], cl[j + 1]) for j in range(0, len(cl) - 1, 2) if len(cl[j]) == len(cl[j + 1])]
        rows = []
        for first, nxt in pairs[:PAIRS_PER_POEM]:
            d = _distractors(rng, by_len[len(nxt)], set(cl))
            if d is None:
                continue
            choices, answer = _choices(rng, nxt, d)
            rows.append({"translation": first, "choices": choices, "answer": answer})
        groups.append(rows)
    return _assign(groups, sizes, rng, key=lambda r: _norm(r["translation"]))


def _build_c3(poems: list[Poem], sizes, rng: random.Random) -> dict[str, list]:
    usable = [p for p in poems if p.title and len(p.text) <= MAX_POEM_CHARS]
    authors = sorted({p.author for p in usable if p.author})
    titles = sorted({p.title for p in usable})
    groups = []
    for i, p in enumerate(usable):
        ask_author = bool(p.author) and len(authors) >= 4 and rng.random() < 0.5
        question, pool, answer = (("这首诗的作者是谁？", authors, p.author) if ask_author
                                  else ("这首诗的题目是什么？", titles, p.title))
        d = _distractors(rng, pool, {answer})
        if d is None:
            continue
        choices, _ = _choices(rng, answer, d)
        groups.append([[list(p.lines), [{"question": question, "choice": choices, "answer": answer,
                                          "id": f"demo-{i}-0"}], f"demo-{i}"]])
    return _assign(groups, sizes, rng, key=lambda r: _norm("".join(r[0])))  # the poem: one question per poem


def _build_lcsts(poems: list[Poem], sizes, rng: random.Random) -> dict[str, list]:
    usable = [p for p in poems if p.title and len(p.text) <= MAX_POEM_CHARS]
    return _assign([[{"text": p.text, "summary": p.title}] for p in usable], sizes, rng,
                   key=lambda r: _norm(r["text"]))


_NAMES = ("小明", "小红", "小刚", "小华", "小丽", "小军", "小芳", "小亮")
_THINGS = ("苹果", "铅笔", "本子", "糖果", "气球", "橘子", "贴纸", "小球")


def _math_problem(rng: random.Random) -> tuple[str, str]:
    """One templated word problem and its Math23K-style equation."""
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.randrange(9)
    if kind == 0:
        return f"{name}有{a}个{thing}，又买了{b}个，现在一共有多少个{thing}？", f"x={a}+{b}"
    if kind == 1:
        a = a + b
        return f"{name}有{a}个{thing}，送给同学{b}个，还剩多少个{thing}？", f"x={a}-{b}"
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"每盒{thing}有{a}个，{name}买了{b}盒，一共有多少个{thing}？", f"x={a}*{b}"
    if kind == 3:
        q, b = rng.randint(2, 12), rng.randint(2, 9)
        return f"{q * b}个{thing}平均分给{b}个小朋友，每人分到多少个？", f"x={q * b}/{b}"
    if kind == 4:
        p, r = rng.randrange(100, 1000, 10), rng.choice((10, 20, 25, 30, 40, 50))
        return f"一件商品原价{p}元，降价{r}%后的价格是多少元？", f"x={p}*(1-{r}%)"
    if kind == 5:
        k = rng.choice((2, 3, 4, 5))
        length = k * rng.randint(2, 20)
        return f"一根绳子长{length}米，用去了它的(1/{k})，还剩多少米？", f"x={length}*(1-(1/{k}))"
    if kind == 6:
        return f"学校有男生{a}人，女生比男生多{b}人，全校一共有多少人？", f"x={a}+({a}+{b})"
    if kind == 7:
        v, t = rng.randrange(40, 90, 5), rng.randint(3, 30)
        return f"{name}每分钟走{v}米，走了{t}分钟，一共走了多少米？", f"x={v}*{t}"
    c = rng.randint(2, 9)
    return f"{name}买了{a}个{thing}和{b}个本子，每个都是{c}元，一共花了多少元？", f"x=({a}+{b})*{c}"


def _build_math23k(poems, sizes, rng: random.Random) -> dict[str, list]:
    from .mathexpr import evaluate_expression

    seen, groups = set(), []
    for _ in range(50 * sum(sizes)):
        if len(groups) >= sum(sizes):
            break
        text, equation = _math_problem(rng)
        if text in seen:
            continue
        seen.add(text)
        value = evaluate_expression(equation)
        ans = str(int(value)) if value == int(value) else f"{value:g}"
        groups.append([{"id": str(len(groups) + 1), "text": text, "equation": equation, "ans": ans}])
    return _assign(groups, sizes, rng, key=lambda r: r["text"])


@dataclass(frozen=True)
class _Demo:
    base: str  # the CUGE task whose raw format it writes
    build: object
    uses_corpus: bool = True


DEMOS = {
    "demo-ccpm": _Demo("ccpm", _build_ccpm),
    "demo-c3": _Demo("c3", _build_c3),
    "demo-lcsts": _Demo("lcsts", _build_lcsts),
    "demo-math23k": _Demo("math23k", _build_math23k, uses_corpus=False),
}
_WRITE = {  # raw file name per split and how rows are written, per mirrored task
    "ccpm": ({"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}, "jsonl"),
    "c3": ({"train": "train.json", "valid": "valid.json", "test": "test.json"}, "json"),
    "lcsts": ({"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}, "jsonl"),
    "math23k": ({"train": "train.json", "valid": "valid.json", "test": "test.json"}, "json"),
}


def build_demo_task(name: str, corpus_dir: str | Path | None, out_dir: str | Path, seed: int = 0,
                    sizes: tuple[int, int, int] = DEFAULT_SIZES) -> Path:
    """Write demo task `name`'s raw files (train/valid/test, its CUGE task's format) and demo.json into out_dir.

    corpus_dir None means the default corpus (fortunes-zh, fetched once). Same corpus + seed + sizes -> same
    bytes. Returns out_dir."""
    if name not in DEMOS:
        raise CpmantError(f"unknown demo task {name!r}; demo tasks: {', '.join(DEMOS)}", "pass one of those")
    demo = DEMOS[name]
    if demo.uses_corpus:
        poems, corpus_sha = corpus_poems(corpus_dir)
    else:
        poems, corpus_sha = [], ""
    rng = random.Random(f"{name}:{seed}:{DEMO_VERSION}")
    splits = demo.build(poems, tuple(sizes), rng)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    names, style = _WRITE[demo.base]
    for split, rows in splits.items():
        if style == "jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"
        atomic_write_text(out / names[split], text)
    manifest = {"task": name, "format": demo.base, "seed": seed, "sizes": list(sizes), "version": DEMO_VERSION,
                "corpus": str(corpus_dir) if corpus_dir is not None else "default (fortunes-zh)",
                "corpus_sha256": corpus_sha, "counts": {s: len(r) for s, r in splits.items()},
                "note": "demo task: its scores are not CUGE scores"}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
    return out


def _built(folder: Path) -> tuple[int | None, tuple[int, ...] | None]:
    """(builder version, sizes) of a built demo folder; (None, None) when it holds no complete build."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return manifest.get("version"), tuple(manifest.get("sizes") or ())
    except (OSError, ValueError, AttributeError):
        return None, None


def _corpus_key(corpus_dir: Path) -> str:
    """A cheap key of a corpus folder: path, file names, sizes and mtimes (no reading)."""
    files = [corpus_dir] if corpus_dir.is_file() else sorted(p for p in corpus_dir.rglob("*") if p.is_file())
    stats = [(str(p.relative_to(corpus_dir) if p != corpus_dir else p.name), p.stat()) for p in files]
    return sha256_json({"corpus": str(corpus_dir.resolve()),
                        "files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats]})[:12]


@dataclass
class DemoTask(Task):
    """A demo task: the mirrored CUGE task's format and metrics, data built from a corpus by seed."""

    seed: int = 0
    sizes: tuple[int, int, int] = DEFAULT_SIZES

    def build_dir(self, data_dir: str | Path | None = None) -> Path:
        """The folder of the built raw files (built on first use): see the module docstring."""
        from ..paths import subdir

        if data_dir is not None:
            d = Path(data_dir).expanduser()
            if (d / MANIFEST).is_file():
                return d
            if not d.exists():
                raise CpmantError(f"corpus folder {d} for demo task {self.name} does not exist",
                                  "pass a corpus folder (.txt/.jsonl files), a built demo folder, or nothing "
                                  "(the default corpus)")
            folder = f"{self.name}-{self.seed}-{_corpus_key(d)}"
        else:
            folder = f"{self.name}-{self.seed}"
        sized = "" if tuple(self.sizes) == DEFAULT_SIZES else "-" + "x".join(map(str, self.sizes))
        out = subdir("cuge") / (folder + sized)
        if _built(out) != (DEMO_VERSION, tuple(self.sizes)):  # not built yet, by older code, or other sizes
            build_demo_task(self.name, data_dir, out, seed=self.seed, sizes=tuple(self.sizes))
        return out

    def data_dir(self, data_dir: str | Path | None = None) -> Path:
        return self.build_dir(data_dir)

    def load(self, split: str, data_dir: str | Path | None = None, malformed_threshold: float = 0.01) -> Examples:
        """The examples of a split, building the demo data first when needed (data_dir: a corpus folder or a
        built demo folder; None: the default corpus)."""
        normalize_split(split)
        return super().load(split, data_dir, malformed_threshold)

    def with_seed(self, seed: int, sizes: tuple[int, int, int] | None = None) -> "DemoTask":
        from dataclasses import replace

        return replace(self, seed=seed, sizes=tuple(sizes) if sizes else self.sizes)


def _demo_factory(name: str):
    def factory() -> DemoTask:
        demo = DEMOS[name]
        base = {"ccpm": _ccpm, "c3": _c3, "lcsts": _lcsts, "math23k": _math23k}[demo.base]()
        names, _ = _WRITE[demo.base]
        fields = {k: getattr(base, k) for k in ("kind", "primary_metric", "metrics", "parse", "reader",
                                                "max_len", "data_format")}
        max_new = {"demo-lcsts": 16, "demo-math23k": 24}.get(name, base.max_new_tokens)
        return DemoTask(name=name, files={s: ((names[s],),) for s in SPLITS}, is_demo=True,
                        description=f"demo task in {demo.base}'s format, built from the corpus (not a CUGE score); "
                                    f"{'/'.join(map(str, DEFAULT_SIZES))} train/valid/test examples (fewer when "
                                    "the corpus gives fewer: demo.json's counts)",
                        max_new_tokens=max_new, **fields)

    return factory


for _name in DEMOS:
    register_task(_name)(_demo_factory(_name))
