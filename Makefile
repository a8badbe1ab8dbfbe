# Deckard: two commands do all the set-up on a fresh Debian 12 machine (root, apt reachable).
#   make up    install what is missing, build the default desktop image, run the all-in-one farm
#   make test  install what is missing and run the whole test suite (lint, types, layers, tests)
# Both are idempotent: stamps under .cache/ make the second run fast.

SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMPS := .cache/stamps
APT_PACKAGES := lxc debootstrap iproute2 iptables zstd postgresql-15 procps psmisc python3-venv chromium
HOME_DIR ?= /var/lib/deckard
PYTEST_ARGS ?=

.PHONY: up down test lint unit integration e2e chaos bench deps clean-cache

up: deps
	ln -sf $(CURDIR)/$(VENV)/bin/deckard /usr/local/bin/deckard
	$(VENV)/bin/deckard up --home $(HOME_DIR)

down:
	$(VENV)/bin/deckard down --home $(HOME_DIR)

deps: $(STAMPS)/apt $(STAMPS)/venv $(STAMPS)/web

$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "installing system packages: $(APT_PACKAGES)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

# browser assets (noVNC, charts) come from npm at build time and are served by the API: no CDN at run time
$(STAMPS)/web: web/package.json web/package-lock.json web/build.mjs $(wildcard web/src/*)
	@mkdir -p $(STAMPS)
	@command -v npm >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm)
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build
	@touch $@

lint: deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: deps lint
	$(VENV)/bin/pytest -ra $(PYTEST_ARGS)

unit: deps
	$(VENV)/bin/pytest -ra tests/unit $(PYTEST_ARGS)

integration: deps
	$(VENV)/bin/pytest -ra tests/integration $(PYTEST_ARGS)

e2e: deps
	$(VENV)/bin/pytest -ra tests/e2e $(PYTEST_ARGS)

chaos: deps
	$(VENV)/bin/pytest -ra tests/chaos $(PYTEST_ARGS)

bench: deps
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	$(VENV)/bin/python bench/time_to_desktop.py
	$(VENV)/bin/python bench/api_scale.py
	$(VENV)/bin/python bench/farm_scale.py
	$(VENV)/bin/python bench/farm_failover.py
	$(VENV)/bin/python bench/abuse.py
	$(VENV)/bin/python bench/fuzz.py --cases 1000000

clean-cache:
	rm -rf .cache
