"""The README is executable: every `cpmant ...` line of a ```bash block in README.md and docs/*.md runs, exit 0.

Each command runs as written, with only these substitutions (a micro model instead of minutes of training):
- stage verbs (`pretrain`, `compress`, `tune`, `validate`) get `--config micro.yaml` (a micro model on the fixture
  corpus, a few steps, small tuning and validation sets); `--max-steps N` becomes 8; `pretrain.seq_len=256` 64
  (the micro model's positions);
- placeholders: `RUN_ID` the micro pretraining run, `URI` the micro base's candidate, `path/to/folder` the fixture
  corpus, `~/cuge/lcsts` the LCSTS fixture files (less the malformed rows the loader tests use), `configs/my.yaml` micro.yaml, `./x` and `/tmp/...` paths a
  temporary folder, `--port 5001` a free port; `models:/cpm-ant-tiny/2` and `/3` (versions the README's story made
  earlier) the micro base's version 1.
- `serve` starts the server, sends the README's request (the `curl` line beside it) and stops it.
The first command of each verb runs through the console script (`.venv/bin/cpmant`, a new process: what a user
types); the rest through the same `main([...])` in this process. `cpmant validate` may exit 1 (a gate failed, the
verb's documented outcome on a micro model) when it printed the failed gate.
A command that is not run is in SKIP with its reason; a new README command that matches no rule fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _serving import serve_and_ask
from conftest import FIXTURES
from test_registry_server import free_port

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
STAGE_VERBS = ("pretrain", "compress", "tune", "validate", "lifecycle")
# the order a user's story needs: a model before its variants, deltas and validation; serve/report/rerun last
VERB_ORDER = ("pretrain", "compress", "tune", "validate", "promote", "lineage", "pull", "generate", "serve",
              "register", "convert", "report", "rerun")

# substrings of a command -> why it is not run here
SKIP = {
    "--backend bminf": "BMInf needs CUDA (tests/test_gpu.py, gpu tier)",
    "--device cuda": "needs a CUDA device (gpu tier)",
    "--preset small --config configs/small-gpu.yaml": "the small preset's GPU config: hours on a CPU",
    "--nproc 2": "two torchrun processes: tests/test_resume.py runs training with 2 processes",
    "cpmant lifecycle": "the whole lifecycle takes minutes: tests/test_lifecycle.py runs it on the micro model",
    "cpm_live_10B": "CPM-Live's published 10B is a 19 GB download: tests/test_convert_cpmlive_10b_layout.py converts "
                    "a small checkpoint in its layout and generates from it under a budget with --int8",
    "generate cpm-ant-10b ": "the converted 10B (above); bench/bench_10b.py runs the 10b preset through this command",
}


def readme_commands() -> list[tuple[str, str]]:
    """(where, command) for each `cpmant` line of a bash block, comments dropped, continuations joined."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
            first_line = text[: m.start()].count("\n") + 2
            block = m.group(1)
            lines = block.split("\n")
            i = 0
            while i < len(lines):
                line, n = lines[i], i
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                cmd = re.sub(r"\s+#.*$", "", line).strip()
                if re.match(r"(\.venv/bin/)?cpmant\s", cmd):
                    out.append((f"{doc.relative_to(REPO)}:{first_line + n}", cmd))
    return out


def micro_yaml(path: Path) -> Path:
    from _micro_lifecycle import micro_config

    cfg = micro_config(path.parent)
    cfg["tune"] = {"tasks": "demo-ccpm", "methods": "lora", "epochs": 1, "batch_size": 8, "eval_batch_size": 16,
                   "max_train_examples": 16, "max_eval_examples": 16}
    cfg["validation"] = {"max_new_tokens": 4, "task_examples": 16, "batch_size": 4}
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def clean_copy(src: Path, dst: Path) -> Path:
    """The LCSTS fixture without the rows it holds to test the loader's malformed-row handling (an empty text)."""
    dst.mkdir(parents=True)
    for f in src.glob("*.jsonl"):
        rows = [r for r in f.read_text(encoding="utf-8").splitlines() if r.strip() and json.loads(r).get("text")]
        (dst / f.name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return dst


class Story:
    """The substitutions of one run of the README, and what earlier commands made."""

    def __init__(self, tmp: Path):
        self.tmp, self.run_id = tmp, None
        self.micro = micro_yaml(tmp / "micro.yaml")
        self.lcsts = clean_copy(FIXTURES / "cuge" / "lcsts", tmp / "cuge" / "lcsts")

    def output(self, name: str) -> str:
        """A path under the temporary folder that no earlier command used (two README lines pull to ./merged)."""
        path, n = self.tmp / "out" / name, 1
        while path.exists():
            n += 1
            path = self.tmp / "out" / f"{name}-{n}"
        return str(path)

    def argv(self, cmd: str) -> list[str]:
        words = shlex.split(cmd)
        words[0] = "cpmant"
        verb = words[1]
        out: list[str] = []
        it = iter(range(len(words)))
        for i in it:
            w = words[i]
            if w == "--max-steps":
                out += [w, "8"]
                next(it)
                continue
            if w == "--config":
                out += [w, str(self.micro)]
                next(it)
                continue
            if w == "--port":
                out += [w, str(free_port())]
                next(it)
                continue
            if re.match(r"^(\./|/tmp/)", w) or w == "report.html":  # an output: a new folder of its own
                w = self.output(w.removeprefix("./").removeprefix("/tmp/"))
            else:
                w = {"RUN_ID": self.run_id or "RUN_ID", "URI": "models:/cpm-ant-tiny@candidate",
                     "path/to/folder": str(FIXTURES / "corpus"), "~/cuge/lcsts": str(self.lcsts),
                     "pretrain.seq_len=256": "pretrain.seq_len=64"}.get(w, w)
                w = re.sub(r"^models:/cpm-ant-tiny/[23]$", "models:/cpm-ant-tiny/1", w)
            out.append(w)
        if verb in STAGE_VERBS and "--config" not in out:
            out += ["--config", str(self.micro)]
        return out


def _skip_reason(cmd: str) -> str | None:
    return next((why for pat, why in SKIP.items() if pat in cmd), None)


def _serve_and_ask(argv: list[str], env: dict, readme_request: dict) -> tuple[int, str]:
    """`cpmant serve` as the README shows it (on a free port when it names none), asked the README's request."""
    if "--port" not in argv:
        argv = [*argv, "--port", str(free_port())]
    return serve_and_ask(argv[2:], env, argv[argv.index("--port") + 1], readme_request)


def _readme_request() -> dict:
    """The JSON body of the README's `curl ... /invocations` line."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"/invocations.*?-d '(\{.*?\})'", text, re.S)
    assert m, "README.md shows no /invocations request"
    return json.loads(m.group(1))


def test_every_readme_command_is_found_and_planned():
    """Cheap: the commands are found, and every one is either run or skipped with a reason."""
    cmds = readme_commands()
    assert len(cmds) >= 30, cmds
    verbs = {shlex.split(c)[1] for _, c in cmds}
    assert {"pretrain", "compress", "tune", "validate", "promote", "generate", "pull", "serve", "lineage",
            "report", "rerun"} <= verbs
    unknown = sorted(v for v in verbs if v not in VERB_ORDER and v != "lifecycle")
    assert not unknown, f"README verbs with no place in the story: {unknown}"


@pytest.mark.usefixtures("prefect_harness")
def test_readme_commands_run(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from cpmant_cli.main import main

    home = tmp_path / "home"
    monkeypatch.setenv("CPMANT_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(REPO)  # where the README's commands are typed (`./x` outputs go to a temporary folder)
    story = Story(tmp_path)
    env = {**os.environ, "CPMANT_HOME": str(home), "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    cmds = [(w, c) for w, c in readme_commands()]
    cmds.sort(key=lambda wc: VERB_ORDER.index(shlex.split(wc[1])[1]) if shlex.split(wc[1])[1] in VERB_ORDER
              else -1)
    seen_verbs: set[str] = set()
    ran, skipped, failures, done = [], [], [], set()
    for where, cmd in cmds:
        why = _skip_reason(cmd)
        if why:
            skipped.append((where, cmd, why))
            continue
        argv = story.argv(cmd)
        key = " ".join(argv)
        if key in done:  # the same command shown in two places runs once
            continue
        done.add(key)
        verb = argv[1]
        t0 = time.perf_counter()
        if verb == "serve":
            rc, out = _serve_and_ask(argv, env, _readme_request())
        elif verb not in seen_verbs:  # the console script, in a new process
            proc = subprocess.run([str(Path(sys.executable).with_name("cpmant")), *argv[1:]], env=env, text=True,
                                  capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        else:
            import contextlib
            import io

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                try:
                    rc = main(argv[1:])
                except SystemExit as e:  # argparse
                    rc = e.code
            out = buf.getvalue()
        seen_verbs.add(verb)
        if verb == "pretrain" and story.run_id is None and rc == 0:
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
            runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.cpmant.stage = 'pretrain'",
                                      output_format="list")
            story.run_id = runs[-1].info.run_id if runs else None
        ok = rc == 0 or (verb == "validate" and rc == 1 and "failed gate" in out)
        ran.append((where, " ".join(argv[1:]), rc, round(time.perf_counter() - t0, 1)))
        if not ok:
            failures.append(f"{where}: {cmd}\n  ran: {' '.join(argv)}\n  exit {rc}\n{out[-3000:]}")
    print("\n".join(f"ran  {w}  exit {rc}  {s} s  cpmant {a}" for w, a, rc, s in ran))
    print("\n".join(f"skip {w}  {c}  ({why})" for w, c, why in skipped))
    assert not failures, "\n\n".join(failures)
    assert len(ran) >= 25 and {"pretrain", "compress", "tune", "validate", "promote", "generate", "pull", "serve",
                               "lineage", "report", "rerun"} <= seen_verbs
