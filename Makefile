# The record service. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PYTHON := .venv/bin/python
# checkov runs from PyPI in a tool environment of its own (its dependencies clash with ours).
CHECKOV_VERSION := 3.3.30

.PHONY: help install tools test-tools lint infra-check test test-unit test-reliability sweep audit dev migrate clean-data up down test-compose image-report bench bench-smoke deploy-aws deploy-gcp

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

install: ## create .venv from the lock file (installs uv with pip if it is missing)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

tools: install ## install ffmpeg and nginx if missing, build the minimal ffmpeg (root on Debian)
	$(PYTHON) -m devstack --install-tools

lint: install ## ruff (lint + format check), mypy --strict, deptry (every import declared)
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy common/src devstack/src functions scripts migrations tests bench
	$(UV) run --frozen deptry functions migrations tests bench scripts
	cd common && $(UV) run --frozen deptry src
	cd devstack && $(UV) run --frozen deptry src

infra-check: ## checkov on infra/ (every skip carries its reason in the template)
	$(UV) tool run --from checkov==$(CHECKOV_VERSION) checkov -d infra --quiet --compact --skip-download

test: lint infra-check tools test-tools ## lint, checkov, then every test tier (unit, integration, end to end)
	$(UV) run --frozen pytest

test-tools: ## install Chromium if missing (the /docs page test; apt-get as root on Debian)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "install Chromium (Debian: sudo apt-get install chromium)" >&2; exit 1; fi; }

test-reliability: install tools ## fault injection and load on a stack of their own (a few minutes)
	$(UV) run --frozen pytest tests/reliability -m reliability

sweep: install ## remove record objects without rows and stale multipart uploads (SWEEP_GRACE_SECONDS)
	$(UV) run --frozen python -m common.ops.sweep

audit: install ## known vulnerabilities in the locked dependencies (pip-audit; security/audit-allowlist.txt)
	$(PYTHON) scripts/audit.py

test-unit: install ## only the tests that need no servers
	$(UV) run --frozen pytest tests/unit

dev: install tools ## start the whole native stack on http://127.0.0.1:$${PORT:-8080}
	$(PYTHON) -m devstack

migrate: install ## apply the database migrations to DATABASE_URL
	$(UV) run --frozen alembic upgrade head

clean-data: ## delete the native stack's data (.data/): users, records and MP3s
	rm -rf .data

up: ## build the images and start the compose stack on http://127.0.0.1:$${PORT:-8080}; returns once healthy
	docker compose up --build -d --wait

down: ## stop the compose stack; its data (named volumes) is kept
	docker compose down

test-compose: install tools ## the compose tier on a real Docker engine (docker-sandbox when present)
	$(UV) run --frozen pytest -m compose tests/compose -v -s

image-report: install ## each function image's size and docker-run-to-first-200 time (stack up)
	$(PYTHON) -m devstack.images --project $${COMPOSE_PROJECT_NAME:-record-service}

bench: install tools ## performance figures on the native stack (minutes); writes bench/results.md
	$(PYTHON) -m bench $(if $(SMOKE),--smoke,)

bench-smoke: install tools ## the benchmark with tiny sizes (under a minute): proves it still runs
	$(PYTHON) -m bench --smoke

deploy-aws: install ## build, push to ECR, deploy infra/aws/template.yaml, migrate (README: Deploy to AWS Lambda)
	bash scripts/deploy_aws.sh

deploy-gcp: install ## build, push to Artifact Registry, deploy Cloud Run + load balancer, migrate (README: Deploy to Cloud Run)
	bash scripts/deploy_gcp.sh
