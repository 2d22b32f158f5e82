"""The task registry, the Example and Task types: loading with malformed-row accounting (files read by
`rawfiles`), CPM-Ant's fine-tuning format (rows built by `formatting`, after CPM-Live `examples/tune.py` /
`infer.py`, branch cpm-ant), evaluation and scoring (`metrics`).

    @register_task("lcsts")
    def lcsts() -> Task: ...

`get_task(name)` builds the registered task; adding a task is one function that registers itself.

Fine-tuning format (every row): the task-1 prompt (prompt ids P..2P-1; task 0 when the model has one prompt type),
segment 0, positions 0..P-1; then the text, segment 2, positions P.., span 0; rows are padded on the right.
- generation: `<s> + input + target + </s>`; the target and `</s>` are non-context; the target at position i is
  the token at i+1 where i+1 is non-context; loss = mean cross-entropy over those tokens of the batch.
- choice: one all-context row per option, `<s> + input + option + "[是否正确]"`; the option's score is the logit of
  "是" at the row's last position; softmax over the example's options, cross-entropy on the answer.
- ranking (Sogou-Log): one all-context row per (query, document), `<s> + input + "[是否正确]"` (CPM-Live's
  `CPMAntScoreInfer` row); p = softmax over the vocabulary of "是" at the last position; loss = binary
  cross-entropy of p against relevant (label > 0); the ranking score is log p (graded labels feed nDCG).
Inputs that do not fit `max_len` (and the model's position limit) are cut from the left, keeping `<s>`, as
CPM-Live cuts them; a target longer than half the room is cut to its first tokens. `<unk>` ids are dropped.

Generation for evaluation uses CPM-Live's CUGE inference settings (`examples/infer_cpm_ant.py`): beam search of
width 3, repetition penalty 1.0 (off: equations and summaries repeat tokens legitimately), the task-1 prompt (as
CPM-Live's `CPMAntNLGInfer` uses the tuning prompt), `max_new_tokens` per task (`Task.max_new_tokens`);
`Task.generation_settings` gives them, `generation={...}` overrides them.

Zero-shot (`predict(..., zero_shot=True)`, `evaluate(..., zero_shot=True)`): the same rows with the prompt the base
was pretrained with, the left-to-right LM task's (task 2, `cpmant.training.data.TASK_LM`; segment 2 as in tuning, which
is also the LM task's text segment), since an untuned base has never seen the task-1 tuning prompt in this role.

`max_len` per task is CPM-Live's `--tune-maxlen` (C3 1024, KdConv 1500, the short tasks 256), capped by the model's
position limit (`position_bias_max_distance`); `Task.effective_max_len(model)` says the cap once, in a warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import CpmantError
from ..hashing import Sha256
from .formatting import IGNORE, Formatter, generate_tuned
from .rawfiles import Malformed, Row

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"dev": "valid", "eval": "valid", "validation": "valid"}
KINDS = ("choice", "generation", "ranking")
DEFAULT_MAX_LEN = 256  # CPM-Live's --tune-maxlen for the short tasks (C3 1024 and KdConv 1500: cuge/tasks.py)
# CPM-Live's CUGE inference (examples/infer_cpm_ant.py via cpm_live/generation/ant.py): beam 3, no repetition penalty
CUGE_GENERATION = {"temperature": 0.0, "num_beams": 3, "repetition_penalty": 1.0}
_CAP_WARNED: set[tuple[str, int, int]] = set()  # (task, max_len, cap) already said


@dataclass(frozen=True)
class Example:
    """One task example, in CPM-Live's data-line terms (`{"input", "target"}` / `{"input", "options", "target"}`).

    generation: `input` -> `target`. choice: `input`, `options`, `label` = index of the right option (`target`
    is its text). ranking: `input` (query and document), `label` = relevance grade, `group` = the query.
    `answer`: Math23K's gold value. `source`: "file:line" of the raw row, the file relative to the task's folder."""

    input: str
    target: str = ""
    options: tuple[str, ...] = ()
    label: int | None = None
    group: str = ""
    answer: float | None = None
    source: str = ""

    def to_record(self) -> dict:
        """The CPM-Live data line of this example."""
        if self.options:
            return {"input": self.input, "options": list(self.options), "target": self.label}
        if self.group:
            return {"input": self.input, "target": self.label, "group": self.group}
        return {"input": self.input, "target": self.target}


class Examples(list):
    """A list of Example with the load's accounting: rows read, malformed rows, the files."""

    def __init__(self, items=(), rows: int = 0, malformed: int = 0, files: tuple[str, ...] = (),
                 problems: tuple[str, ...] = ()):
        super().__init__(items)
        self.rows, self.malformed, self.files, self.problems = rows, malformed, files, problems


# ---- tasks ----------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """A CUGE (or demo) task: where its raw files are, how a raw row becomes examples, how it is scored.

    files: per split, alternatives of file-name groups: the first alternative with any file present is read
    (every present file of it, in order). parse: raw row value -> examples (raise Malformed or KeyError/TypeError/
    ValueError for a bad row). reader: read_jsonl or read_json_values."""

    name: str
    kind: str
    primary_metric: str
    metrics: list[str]
    files: dict[str, tuple[tuple[str, ...], ...]]
    parse: Callable[[Any], list[Example]]
    reader: Callable[[Path], Iterator[Row]]
    description: str = ""
    dir_names: tuple[str, ...] = ()  # folder names under $CUGE_DATA (besides `name`)
    max_len: int = DEFAULT_MAX_LEN
    max_new_tokens: int = 32
    is_demo: bool = False
    data_format: str = ""  # one line on the raw format, for docs and errors

    # -- loading -------------------------------------------------------------------------------------------------
    def data_dir(self, data_dir: str | Path | None = None) -> Path:
        """The folder of this task's raw files: data_dir (or its <name> subfolder when it holds no task file
        itself), else $CUGE_DATA/<name> (or the task's official name, e.g. LCSTS)."""
        if data_dir is not None:
            d = Path(data_dir).expanduser()
            if not d.is_dir():
                what = "is a file, not a folder" if d.exists() else "does not exist"
                raise CpmantError(f"data folder {d} for task {self.name} {what}",
                                  f"pass `--data DIR` with the task's raw files ({self.expected_files()})")
            has_files = any((d / f).is_file() for alts in self.files.values() for g in alts for f in g)
            for sub in (self.name, *self.dir_names):  # a folder of several tasks, like CUGE_DATA, works too
                if not has_files and (d / sub).is_dir():
                    return d / sub
            return d
        root = os.environ.get("CUGE_DATA")
        if not root:
            raise CpmantError(f"no data for CUGE task {self.name}: neither `--data DIR` nor CUGE_DATA is set",
                              f"download the task and pass `--data DIR` (files: {self.expected_files()}), or set "
                              f"CUGE_DATA to a folder holding {self.name}/; the demo tasks (demo-*) need no data")
        for sub in (self.name, *self.dir_names):
            if (Path(root).expanduser() / sub).is_dir():
                return Path(root).expanduser() / sub
        raise CpmantError(f"CUGE_DATA={root} has no folder {' or '.join((self.name, *self.dir_names))}",
                          f"put the task's files ({self.expected_files()}) in {Path(root) / self.name}, or pass "
                          "`--data DIR`")

    def expected_files(self, split: str | None = None) -> str:
        splits = [split] if split else list(SPLITS)
        return "; ".join(f"{s}: " + " or ".join("+".join(g) for g in self.files[s]) for s in splits)

    def split_files(self, split: str, data_dir: Path) -> list[Path]:
        split = normalize_split(split)
        for group in self.files[split]:
            present = [data_dir / f for f in group if (data_dir / f).is_file()]
            if present:
                return present
        raise CpmantError(f"task {self.name}: no {split} file in {data_dir} (expected "
                          f"{self.expected_files(split)})",
                          f"put the {split} split there under one of those names ({self.data_format})")

    def load(self, split: str, data_dir: str | Path | None = None, malformed_threshold: float = 0.01) -> Examples:
        """The examples of one split (train | valid | test; `dev` means valid) from the task's raw files.

        Malformed rows are skipped and counted: a warning names the count; when more than malformed_threshold
        of the rows are malformed the load fails with a CpmantError naming the file and line of the first."""
        d = self.data_dir(data_dir)
        return self.load_files(self.split_files(split, d), malformed_threshold, root=d)

    def load_files(self, paths: list[Path], malformed_threshold: float = 0.01, root: Path | None = None) -> Examples:
        """Examples of the given raw files. Each Example's `source` is "file:line" with the file relative to root
        (its name when root is None), so examples hash the same wherever the data lives; errors name full paths."""
        if not 0.0 <= malformed_threshold <= 1.0:
            raise CpmantError(f"malformed_threshold must be between 0 and 1, got {malformed_threshold}",
                              "use a fraction such as 0.01")
        examples: list[Example] = []
        rows, problems = 0, []
        for path in paths:
            for row in self.reader(path):
                rows += 1
                try:
                    if isinstance(row.value, Malformed):
                        raise row.value
                    got = self.parse(row.value)
                except (Malformed, KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
                    why = (f"missing key {e}" if isinstance(e, KeyError) else
                           "nested too deeply" if isinstance(e, RecursionError) else str(e))
                    problems.append(f"{row.path}:{row.line}: {why}")
                    continue
                rel = row.path.relative_to(root).as_posix() if root is not None else row.path.name
                source = f"{rel}:{row.line}"
                examples.extend(_with_source(ex, source) for ex in got)
        files = tuple(str(p) for p in paths)
        bad = len(problems)
        if rows and bad / rows > malformed_threshold:
            raise CpmantError(
                f"task {self.name}: {bad} of {rows} rows are malformed ({100 * bad / rows:.1f}% > "
                f"{100 * malformed_threshold:g}%); first: {problems[0]}",
                f"fix those rows ({self.data_format}), or raise the threshold (tune.malformed_threshold)")
        if bad:
            warnings.warn(f"task {self.name}: skipped {bad} malformed of {rows} rows (first: {problems[0]})",
                          stacklevel=3)
        if not examples:
            raise CpmantError(f"task {self.name}: no examples in {', '.join(files)}",
                              f"check the files hold the task's format ({self.data_format})")
        return Examples(examples, rows=rows, malformed=bad, files=files, problems=tuple(problems))

    def data_sha256(self, data_dir: str | Path | None = None) -> str:
        """sha256 over every split's raw files (split, file name, bytes): the task data's identity."""
        d = self.data_dir(data_dir)
        h = Sha256(self.name.encode())
        for split in SPLITS:
            for path in self.split_files(split, d):
                data = path.read_bytes()
                h.update(f"{split}:{path.relative_to(d).as_posix()}:{len(data)}:".encode())
                h.update(data)
        return h.hexdigest()

    # -- training and evaluation ---------------------------------------------------------------------------------
    def training_loss(self, model, tokenizer, examples: list[Example]) -> torch.Tensor:
        """Mean loss of the examples in CPM-Ant's fine-tuning format (module docstring); differentiable."""
        if not examples:
            raise CpmantError("training_loss needs at least one example", "pass a non-empty batch")
        fmt = Formatter(model, tokenizer, self.effective_max_len(model))
        if self.kind == "generation":
            batch, target = fmt.generation_batch(examples)
            logits = model(**batch, logits_at=target != IGNORE)
            return F.cross_entropy(logits, target[target != IGNORE])
        if self.kind == "choice":
            scores = self._choice_scores(fmt, model, examples)  # (B, n_options)
            labels = torch.tensor([_label(ex) for ex in examples], device=scores.device)
            return F.cross_entropy(scores, labels)
        logp = self._rank_logp(fmt, model, examples)
        rel = torch.tensor([float((ex.label or 0) > 0) for ex in examples], device=logp.device)
        # -log p for relevant, -log(1-p) for irrelevant; log1p(-exp) is stable, clamped below log 1
        log_not = torch.log1p(-torch.exp(logp.clamp(max=-1e-7)))
        return -(rel * logp + (1 - rel) * log_not).mean()

    def _choice_scores(self, fmt: "Formatter", model, examples: list[Example]) -> torch.Tensor:
        """(B, max options) logits of "是" per option; -inf where an example has fewer options."""
        counts = [len(ex.options) for ex in examples]
        if min(counts) < 1:
            raise CpmantError(f"task {self.name}: a choice example without options", "give every example options")
        batch, last = fmt.judge_batch([(ex.input, opt) for ex in examples for opt in ex.options])
        flat = model(**batch, logits_at=last)[:, fmt.yes_id]  # (sum of counts,)
        if len(set(counts)) == 1:
            return flat.view(len(examples), counts[0])
        scores = flat.new_full((len(examples), max(counts)), float("-inf"))
        row = torch.repeat_interleave(torch.arange(len(examples), device=flat.device),
                                      torch.tensor(counts, device=flat.device))
        col = torch.cat([torch.arange(n, device=flat.device) for n in counts])
        return scores.index_put((row, col), flat)

    def _rank_logp(self, fmt: "Formatter", model, examples: list[Example]) -> torch.Tensor:
        batch, last = fmt.judge_batch([(ex.input, "") for ex in examples])
        logits = model(**batch, logits_at=last)
        return torch.log_softmax(logits.float(), dim=-1)[:, fmt.yes_id]

    def effective_max_len(self, model) -> int:
        """max_len capped by the model's position limit; a cap is said once per (task, max_len, limit)."""
        cap = int(model.config.position_bias_max_distance)
        if self.max_len > cap and (self.name, self.max_len, cap) not in _CAP_WARNED:
            _CAP_WARNED.add((self.name, self.max_len, cap))
            warnings.warn(f"task {self.name}: max_len {self.max_len} (CPM-Live's) is capped at {cap}, the model's "
                          "position limit (position_bias_max_distance): longer inputs lose their start",
                          stacklevel=2)
        return min(self.max_len, cap)

    def generation_settings(self, generation: dict | None = None) -> dict:
        """The GenerationConfig fields `predict` generates with: CUGE_GENERATION, this task's max_new_tokens, then
        `generation`'s overrides."""
        return {"max_new_tokens": self.max_new_tokens, **CUGE_GENERATION, **(generation or {})}

    @torch.no_grad()
    def predict(self, model, tokenizer, examples: list[Example], batch_size: int = 8,
                generation: dict | None = None, zero_shot: bool = False) -> list:
        """Per example: the chosen option index (choice), the generated text (generation), the score (ranking).
        `zero_shot`: with the base's pretraining prompt instead of the tuning prompt (module docstring)."""
        was_training = model.training
        model.eval()
        try:
            fmt = Formatter(model, tokenizer, self.effective_max_len(model), zero_shot=zero_shot)
            settings = self.generation_settings(generation)
            out: list = []
            for i in range(0, len(examples), max(1, batch_size)):
                chunk = examples[i:i + max(1, batch_size)]
                if self.kind == "choice":
                    out.extend(self._choice_scores(fmt, model, chunk).argmax(-1).tolist())
                elif self.kind == "ranking":
                    out.extend(self._rank_logp(fmt, model, chunk).tolist())
                else:
                    out.extend(generate_tuned(model, tokenizer, [ex.input for ex in chunk], settings,
                                              zero_shot=zero_shot))
            return out
        finally:
            model.train(was_training)

    def evaluate(self, model, tokenizer, examples: list[Example], batch_size: int = 8,
                 generation: dict | None = None, zero_shot: bool = False) -> dict[str, float]:
        """The task's metrics (percent, higher is better) on the examples: `{metric: value}` for every metric."""
        if not examples:
            raise CpmantError(f"task {self.name}: nothing to evaluate", "pass at least one example")
        return self.score(self.predict(model, tokenizer, examples, batch_size, generation, zero_shot=zero_shot),
                          examples)

    def score(self, predictions: list, examples: list[Example]) -> dict[str, float]:
        """The metrics of predictions (as `predict` returns them) against the examples."""
        import cpmant.cuge.metrics as M  # noqa: N812

        if len(predictions) != len(examples):
            raise CpmantError(f"{len(predictions)} predictions for {len(examples)} examples",
                              "pass one prediction per example")
        values: dict[str, float] = {}
        for m in self.metrics:
            if m == "accuracy":
                values[m] = M.accuracy(predictions, [_label(ex) for ex in examples])
            elif m == "f1":
                values[m] = M.macro_f1(predictions, [_label(ex) for ex in examples])
            elif m == "rouge_l":
                values[m] = M.rouge_l(predictions, [ex.target for ex in examples])
            elif m == "bleu":
                values[m] = M.bleu(predictions, [ex.target for ex in examples])
            elif m.startswith("distinct"):
                values[m] = M.distinct_n(predictions, int(m.removeprefix("distinct")))
            elif m.startswith("ndcg_"):
                values[m] = M.ndcg_at_k(predictions, [ex.label or 0 for ex in examples],
                                        [ex.group for ex in examples], int(m.removeprefix("ndcg_")))
            elif m == "answer_accuracy":
                values[m] = M.math_answer_accuracy(predictions, [ex.answer for ex in examples])
            else:  # pragma: no cover - a task lists only the metrics above
                raise ValueError(f"unknown metric {m}")
        return values

    # -- intervals (95% bootstrap over examples; nDCG over queries: cpmant.cuge.resampling, cpmant.stats) ---------
    def _statistics(self, predictions: list, examples: list[Example]) -> dict:
        from .resampling import metric_statistic

        if len(predictions) != len(examples):
            raise CpmantError(f"{len(predictions)} predictions for {len(examples)} examples",
                              "pass one prediction per example (in the examples' order)")
        return {m: metric_statistic(self, m, predictions, examples) for m in self.metrics}

    def score_intervals(self, predictions: list, examples: list[Example], seed: int = 0) -> dict:
        """`{metric: Interval}`: each metric of the predictions with its 95% bootstrap interval."""
        return {m: s.interval(seed) for m, s in self._statistics(predictions, examples).items()}

    def paired_intervals(self, pred_a: list, pred_b: list, examples: list[Example], seed: int = 0) -> dict:
        """`{metric: Interval}` of a minus b (points), two models' predictions of the same examples resampled
        together."""
        from .resampling import paired

        a, b = self._statistics(pred_a, examples), self._statistics(pred_b, examples)
        return {m: paired(a[m], b[m], seed) for m in self.metrics}

    def paired_ratio(self, pred_a: list, pred_b: list, examples: list[Example], metric: str | None = None,
                     seed: int = 0):
        """Interval of a's score as a share of b's (default: the primary metric), on the same resamples."""
        from .resampling import metric_statistic, ratio

        m = metric or self.primary_metric
        if len(pred_a) != len(examples) or len(pred_b) != len(examples):
            raise CpmantError(f"{len(pred_a)} and {len(pred_b)} predictions for {len(examples)} examples",
                              "pass one prediction per example from each model")
        return ratio(metric_statistic(self, m, pred_a, examples), metric_statistic(self, m, pred_b, examples), seed)


def _label(ex: Example) -> int:
    if ex.label is None:
        raise CpmantError(f"example {ex.source or ex.input[:20]!r} has no answer label",
                          "choice examples need the index of the right option")
    return ex.label


def _with_source(ex: Example, source: str) -> Example:
    from dataclasses import replace

    return ex if ex.source else replace(ex, source=source)


def normalize_split(split: str) -> str:
    s = SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise CpmantError(f"unknown split {split!r}", f"use one of: {', '.join(SPLITS)}")
    return s


# ---- the registry ---------------------------------------------------------------------------------------------
TASKS: dict[str, Callable[[], Task]] = {}


def register_task(name: str):
    """Decorator: register a zero-argument factory returning the Task called `name`."""

    def deco(factory: Callable[[], Task]):
        TASKS[name] = factory
        return factory

    return deco


def task_names(include_demo: bool = True) -> tuple[str, ...]:
    return tuple(n for n in TASKS if include_demo or not n.startswith("demo-"))


def get_task(name: str) -> Task:
    """The registered task `name`; an unknown name raises CpmantError listing the known ones."""
    if name not in TASKS:
        raise CpmantError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}",
                          "pass one of those names (demo-* tasks are built from the corpus, the others read "
                          "CUGE files from --data DIR or $CUGE_DATA/<task>)")
    task = TASKS[name]()
    if task.name != name or task.kind not in KINDS or task.primary_metric not in task.metrics:
        raise ValueError(f"task factory {name!r} built an inconsistent task")  # a programming error
    return task


__all__ = ["Example", "Examples", "Task", "Malformed", "register_task", "task_names", "get_task", "SPLITS",
           "normalize_split", "generate_tuned"]
