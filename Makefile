PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install protos test test-all lint fixtures clean

install:
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(MAKE) protos

protos:
	mkdir -p cluster/rpc/pb
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=cluster/rpc/pb --pyi_out=cluster/rpc/pb \
		--grpc_python_out=cluster/rpc/pb protos/*.proto
	# generated modules import each other as top-level names; make them package-relative
	sed -i -E 's/^import (\w+_pb2)/from . import \1/' cluster/rpc/pb/*_pb2*.py
	touch cluster/rpc/pb/__init__.py

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check cluster tests scripts bench
	$(BIN)/ruff format --check cluster tests scripts bench
	$(BIN)/mypy cluster

# Rebuild the committed test checkpoints and their reference outputs (needs torch, transformers, mlx-lm;
# see scripts/make_fixtures.py).
fixtures:
	$(REF_PY) scripts/make_fixtures.py tests/fixtures

clean:
	rm -rf $(VENV) cluster/rpc/pb .pytest_cache
