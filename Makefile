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
