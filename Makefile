# DICOM Exchange: `make run` serves the portal on embedded defaults; `make test` runs the whole suite.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 2
# Django 6 needs Python 3.12 or newer: take the first one found.
PYTHON ?= $(shell for p in python3.13 python3.12 $$(ls -d /root/.pyenv/versions/3.1[23]*/bin/python3 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { echo $$p; break; }; done)
# The test suite's PostgreSQL and RabbitMQ (standard local addresses).
TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/dicom_exchange
TEST_BROKER_URL ?= amqp://guest:guest@127.0.0.1:5672//

.PHONY: venv run test lint clean bench

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt agent/pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 or newer is required (set PYTHON=/path/to/python3.12)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet ./agent
	touch $@

run: venv
	$(BIN)/python manage.py migrate --no-input -v0
	$(BIN)/python manage.py collectstatic --no-input -v0
	$(BIN)/python manage.py demo_setup
	@echo
	@echo "Portal: http://$(HOST):$(PORT)/   (log in as dr-tehran to see the demo study received; administration: /admin/, API: /api/v1/)"
	@echo "Send:   $(BIN)/python -m agent --server http://$(HOST):$(PORT) --key <shiraz-imaging key> send FILES..."
	@echo "Receive: $(BIN)/python -m agent --server http://$(HOST):$(PORT) --key <tehran-hospital key> receive --inbox ./inbox"
	@echo "Metrics: http://$(HOST):$(PORT)/metrics (Prometheus; from this machine only)"
	@echo
	trap 'kill 0' EXIT; \
	metrics=$${PORTAL_VAR_DIR:-var}/metrics; rm -rf "$$metrics" && mkdir -p "$$metrics"; \
	$(BIN)/python manage.py run_periodic & \
	PROMETHEUS_MULTIPROC_DIR="$$metrics" METRICS_ALLOWED_ADDRESSES=$${METRICS_ALLOWED_ADDRESSES:-127.0.0.1} \
	$(BIN)/uvicorn portal.asgi:application --host $(HOST) --port $(PORT) --workers $(WORKERS) --no-access-log

test: venv
	bash tests/services.sh
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_BROKER_URL=$(TEST_BROKER_URL) $(BIN)/pytest $(PYTEST_ARGS)

# Benchmarks (not part of `make test`): the production stack against cp, nginx and
# Orthanc; writes docs/benchmarks.md and docs/benchmarks.json. BENCH_ARGS=--small
# runs a quick version.
bench: venv
	bash bench/install-tools.sh
	TCP_NODELAY=1 BENCH_DATABASE_URL=$(TEST_DATABASE_URL) BENCH_BROKER_URL=$(TEST_BROKER_URL) $(BIN)/python -m bench $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check portal centers routing agent studies dicomweb demo tests

clean:
	rm -rf $(VENV) var
