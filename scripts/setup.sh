#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment with the pinned packages, and Debian's package
# lists when `apt-get download` (used to fetch the default corpus) cannot see fortunes-zh yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip 23 knows nothing of PEP 735 groups; a recent pip resolves faster. Constraints pin every transitive package.
.venv/bin/python -m pip install -q --upgrade "pip==26.3"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
if command -v apt-cache >/dev/null && ! apt-cache policy fortunes-zh 2>/dev/null | grep -q 'Candidate: [0-9]'; then
  echo "setup: refreshing Debian's package lists (needed to fetch the fortunes-zh corpus)"
  apt-get update -qq || echo "setup: apt-get update failed; pass --corpus DIR to use your own text" >&2
fi
echo "setup: ready (.venv)"
