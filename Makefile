PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install protos test test-slow test-all lint fixtures bench demo clean

install:
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(MAKE) protos

protos:
	$(BIN)/python setup.py -q build_protos

# The suite without its slow end-to-end cases (under 15 min on 2 cores); CI runs `test` then `test-slow`.
test:
	$(BIN)/python -m pytest -q -m "not slow"

test-slow:
	$(BIN)/python -m pytest -q -m slow

test-all:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check cluster tests scripts bench
	$(BIN)/ruff format --check cluster tests scripts bench
	$(BIN)/mypy cluster

# Rebuild the committed test checkpoints and their reference outputs (needs torch, transformers, mlx-lm;
# see scripts/make_fixtures.py).
fixtures:
	$(REF_PY) scripts/make_fixtures.py tests/fixtures

# Benchmarks on this machine, appended to bench/RESULTS.md (about 15 min on 2 CPU cores; see bench/README.md).
bench:
	$(BIN)/python bench/bench_engine.py --preset llama-3.2-1b --no-peer --out bench/RESULTS.md
	$(BIN)/python bench/bench_cluster.py --out bench/RESULTS.md

# Three nodes on this machine (hosts in network namespaces as root, else processes on loopback) find each other
# over mDNS, show the plan and stream an answer from the tiny model in demo/ (offline; MODEL=qwen3-0.6b for the
# real one). Everything it starts is removed when it ends, also on Ctrl-C.
demo:
	test -x $(BIN)/python && test -d cluster/rpc/pb || $(MAKE) install
	$(BIN)/python demo/run_demo.py $(if $(MODEL),--model $(MODEL))

clean:
	rm -rf $(VENV) cluster/rpc/pb .pytest_cache
