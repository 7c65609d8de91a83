# `make demo` and `make test` each do all set-up on a fresh Debian 12 machine (as root).
PYTHON ?= python3

.PHONY: setup test demo bench vectors lint

setup:
	./deploy/install-deps.sh

test: setup
	$(PYTHON) -m pytest -q

demo: setup
	$(PYTHON) -m synproxy.cli selftest
	$(PYTHON) -m synproxy.cli lab demo

bench: setup
	$(PYTHON) -m benchmarks.bench_cookie
	$(PYTHON) -m synproxy.cli bench --profile

vectors:
	$(PYTHON) tests/vectors/generate.py

lint:
	ruff check synproxy tests benchmarks
