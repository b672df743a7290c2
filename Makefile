# Bootstraps .venv on a fresh machine. torch is pinned to the CPU wheel: an unpinned torch
# would pull several GB of CUDA packages.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-v5
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench serve clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[server,test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/elasticserve demo

serve: install
	$(BIN)/elasticserve serve

lint: install
	$(BIN)/ruff check elasticserve tests
	$(BIN)/mypy elasticserve

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
