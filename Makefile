# Leadwerk: the one front door. `make run` starts everything, `make test` tests everything.
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PYTHON ?= python3

.PHONY: help setup run demo test test-fast lint format bench bench-scoring browser promtool deploy-check image clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(UV):
	@echo "uv not found: installing it from PyPI"
	$(PYTHON) -m pip install --quiet --user uv || $(PYTHON) -m pip install --quiet uv

setup: | $(UV)  ## install uv (if missing) and the locked virtual environment
	@$(UV) sync --all-packages --locked --quiet

run: setup  ## run the whole platform on embedded Postgres + Kafka-protocol broker (Ctrl-C stops)
	@$(UV) run --no-sync python -m leadwerk_platform.devstack

demo: setup  ## the main story against a running `make run`, narrated (start `make run` first)
	@$(UV) run --no-sync python -m demo

browser:  ## install Debian's Chromium for the sdk.js browser tests (root + apt only)
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser tests"; \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) || \
		echo "chromium could not be installed: browser tests will be skipped"; \
	else echo "no /usr/bin/chromium: browser tests will be skipped"; fi

promtool:  ## install Debian's promtool (package prometheus) for the metrics and alert checks
	@if command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing promtool (Debian package prometheus) for the metrics checks"; \
		(apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus \
		  >/dev/null)) || echo "promtool could not be installed: its checks will be skipped"; \
	else echo "no promtool: the metrics and alert-rule checks will be skipped"; fi

test: setup browser promtool  ## the whole suite (starts its own embedded infrastructure)
	@$(UV) run --no-sync pytest

test-fast: setup  ## unit tests only (no broker, no Postgres, no browser)
	@$(UV) run --no-sync pytest -m "not integration"

lint: setup  ## ruff + mypy (strict)
	@$(UV) run --no-sync ruff check .
	@$(UV) run --no-sync mypy
	@$(UV) run --no-sync mypy services/ingest/tests
	@$(UV) run --no-sync mypy services/scoring/tests
	@$(UV) run --no-sync mypy services/workflow/tests
	@$(UV) run --no-sync mypy services/mailer/tests
	@$(UV) run --no-sync mypy services/crm-bridge/tests
	@$(UV) run --no-sync mypy libs/platform/tests tests bench demo
	@$(UV) run --no-sync mypy --strict deploy/grafana/generate.py

format: setup  ## apply ruff's fixes and formatting
	@$(UV) run --no-sync ruff check --fix .

bench: setup  ## every benchmark against its same-run baseline; writes docs/benchmarks.md
	@$(UV) run --no-sync python -m bench.ingest_bench
	@$(UV) run --no-sync python -m bench.scoring_bench
	@$(UV) run --no-sync python -m bench.workflow_bench
	@$(UV) run --no-sync python -m bench.mailer_bench
	@$(UV) run --no-sync python -m bench.crm_bench
	@$(UV) run --no-sync python -m bench.summary

bench-scoring: setup  ## only the stitcher/scorer benchmark (docs/benchmarks-scoring.md)
	@$(UV) run --no-sync python -m bench.scoring_bench

deploy-check: setup  ## render every Kubernetes overlay and validate it offline (needs kubectl)
	@$(UV) run --no-sync python -m leadwerk_platform.deploy --check
	@$(UV) run --no-sync python deploy/grafana/generate.py --check
	@$(UV) run --no-sync pytest -q tests/deploy libs/platform/tests/test_deploy.py

image:  ## build the container image (needs a Docker engine): one image, the command picks the service
	docker build -t leadwerk:dev .

clean:  ## remove local state (embedded Postgres data) and caches
	rm -rf .state .pytest_cache .mypy_cache .ruff_cache
