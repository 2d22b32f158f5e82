# The two commands of a fresh machine (README): `make lifecycle` and `make test`.
.PHONY: setup lifecycle test test-all bench up down

setup:
	bash scripts/setup.sh

lifecycle: setup
	.venv/bin/cpmant lifecycle

# PostgreSQL, the MLflow and Prefect servers, the work pool, the deployments and a worker on 127.0.0.1 (infra/up.sh)
up: setup
	bash infra/up.sh

down:
	bash infra/down.sh

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m "not gpu"

# every benchmark, one after another (one per file: bench/bench_*.py); `make bench BENCH_ARGS=--quick` for smoke runs
BENCH_ARGS ?=
bench: setup
	@set -e; for f in bench/bench_*.py; do echo "== $$f $(BENCH_ARGS)"; .venv/bin/python $$f $(BENCH_ARGS); done
