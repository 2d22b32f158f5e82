"""`cpmant serve` in a new process for the tests that need the real server: start it, send one /invocations request
when it answers, stop it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def serve_and_ask(args: list[str], env: dict, port: str | int, body: dict, timeout: float = 240) -> tuple[int, str]:
    """Run `cpmant serve *args` (which must serve on `port`), POST `body` to /invocations once it answers.
    Returns (0, answer) when the answer holds one non-empty string per input, (3, answer) when it does not, the
    server's exit code and output when it stopped first, (124, message) when it never answered."""
    proc = subprocess.Popen([str(Path(sys.executable).with_name("cpmant")), "serve", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                return proc.returncode, proc.stdout.read()
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(1)
                continue
            preds = answer.get("predictions", answer)
            ok = (isinstance(preds, list) and len(preds) == len(body.get("inputs", preds))
                  and all(isinstance(p, str) and p for p in preds))
            return (0 if ok else 3), json.dumps(answer, ensure_ascii=False)
        return 124, f"the server did not answer in {timeout:.0f} s"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
