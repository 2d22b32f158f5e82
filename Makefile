# The two commands of a fresh machine (README): `make lifecycle` and `make test`.
.PHONY: setup lifecycle test test-all bench

setup:
	bash scripts/setup.sh

lifecycle: setup
	.venv/bin/cpmant lifecycle

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m "not gpu"

bench: setup
	.venv/bin/python bench/bench_pretrain.py
