# Deckard: two commands do all the set-up on a fresh Debian 12 machine (root, apt reachable).
#   make up    install what is missing, build the default desktop image, run the all-in-one farm
#   make test  install what is missing and run the whole test suite (lint, types, layers, tests)
# Both are idempotent: stamps under .cache/ make the second run fast.

SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMPS := .cache/stamps
# nxproxy, xvfb, x11-apps (xwd) and pulseaudio (+ -utils: parec): the client side of the NX tests, as QVD's client
# runs nxproxy and its sound server; openssh-sftp-server and openssh-client (sftp): its side of shared folders;
# fence-agents (fence_ipmilan) + ipmitool fence a lost node through its BMC, and openipmi's ipmi_sim is the BMC the
# fencing tests power off; glusterfs-server/-client: the shared-storage tests run three storage machines in
# namespaces (tests/e2e/test_farm_storage_gluster.py)
APT_PACKAGES := lxc debootstrap iproute2 iptables nftables dnsmasq-base zstd postgresql-15 procps psmisc \
	python3-venv chromium slapd ldap-utils \
	qemu-system-x86 qemu-utils dosfstools mtools e2fsprogs \
	nxproxy xvfb x11-apps pulseaudio pulseaudio-utils openssh-sftp-server openssh-client \
	fence-agents openipmi ipmitool \
	glusterfs-server glusterfs-client
HOME_DIR ?= /var/lib/deckard
PYTEST_ARGS ?=

.PHONY: up down test test-unprivileged lint unit integration e2e chaos bench deps lock wheelhouse clean-cache

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
		echo "slapd slapd/no_configuration boolean true" | debconf-set-selections; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi
	@touch $@

# requirements.lock pins every Python package make up and make test install (as pip constraints).  They come from
# the machine's wheelhouse when it holds every pin (no network needed: an air-gapped machine, or a second clone),
# else from the package index.  `make wheelhouse` fills it while the index is reachable.
WHEELHOUSE ?= /var/cache/deckard/wheels
$(STAMPS)/venv: pyproject.toml requirements.lock
	@mkdir -p $(STAMPS)
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@if [ -d $(WHEELHOUSE) ] && $(VENV)/bin/pip install -q --no-index --find-links $(WHEELHOUSE) \
			-c requirements.lock -e '.[dev]' 2>/dev/null; then \
		echo "installed the pinned Python packages from $(WHEELHOUSE)"; \
	else \
		$(VENV)/bin/pip install -q --upgrade pip && $(VENV)/bin/pip install -q -c requirements.lock -e '.[dev]'; \
	fi
	@touch $@

# without an index, the pins installed in .venv are packed back into wheels (tools/wheels_from_venv.py); the build
# backend (setuptools>=68) is not in the venv: copy its wheel in beside them
wheelhouse: $(STAMPS)/venv
	mkdir -p $(WHEELHOUSE)
	$(VENV)/bin/pip download -q -d $(WHEELHOUSE) --only-binary=:all: -r <(grep -v '^#' requirements.lock) 'setuptools>=68' \
		|| $(VENV)/bin/python tools/wheels_from_venv.py \
			"$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" $(WHEELHOUSE) requirements.lock

# after changing dependencies in pyproject.toml: resolve them afresh and write the pins
lock:
	rm -rf .cache/lock-venv && $(PY) -m venv .cache/lock-venv
	.cache/lock-venv/bin/pip install -q -e '.[dev]'
	(echo "# Exact versions for make up / make test (pip constraints). Regenerate with: make lock"; \
	 .cache/lock-venv/bin/pip freeze --exclude-editable | grep -v '^-e') > requirements.lock
	rm -rf .cache/lock-venv

# browser assets (noVNC, charts) come from npm at build time and are served by the API: no CDN at run time
$(STAMPS)/web: web/package.json web/package-lock.json web/build.mjs $(wildcard web/src/* web/src/*/*)
	@mkdir -p $(STAMPS)
	@command -v npm >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm)
	cd web && npm ci --prefer-offline --no-audit --no-fund --loglevel=error && npm run --silent build
	@touch $@

# the OpenID provider the identity tests log in with (npm oidc-provider, run by tests/oidc_provider.py)
$(STAMPS)/test-oidc: tests/oidc/package.json tests/oidc/package-lock.json
	@mkdir -p $(STAMPS)
	cd tests/oidc && npm ci --prefer-offline --no-audit --no-fund --loglevel=error
	@touch $@

lint: deps
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# test files run on TEST_JOBS cores at once (pytest-xdist); a file's tests stay together, so a module's farm,
# directory or database is made once. Three at once took 12:44-13:09 instead of 15:01, but the browser tests then
# timed out (Playwright's 30 s) on two cores; tried again with the pages' script check (deckard.testing.goto):
# 16:26 on a busy machine, and a session-policy timing test failed: two it stays
TEST_JOBS ?= 2
# The desktop images the end-to-end tests need are built in the background while lint runs
# (tests/prebuild_images.py) and the image-free test files run first (tests/conftest.py); a test that needs one
# sooner waits on the image cache's lock as it would anyway.  Beside lint too: src compiled to bytecode, which
# every Python process of the run (test workers, farms, nodes) then loads instead of compiling deckard's sources
# again (0.3 s of a core each) where PYTHONDONTWRITEBYTECODE is set, as in CI.
test: deps $(STAMPS)/test-oidc
	@mkdir -p .cache; $(VENV)/bin/python tests/prebuild_images.py > .cache/prebuild.log 2>&1 & build=$$!; \
	trap 'wait $$build; cat .cache/prebuild.log' EXIT; \
	$(VENV)/bin/python -m compileall -q src > /dev/null & compiled=$$!; \
	$(MAKE) --no-print-directory lint && wait $$compiled && \
	$(VENV)/bin/pytest -ra --durations=25 -n $(TEST_JOBS) --dist loadfile \
		$(addprefix --ignore=,$(UNPRIVILEGED_TESTS)) $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-unprivileged

# the node daemon's tests must run, not skip, for a user without root: under root, as nobody, with the system's
# Python 3.11 (the venv's interpreter may live under /root) and the venv's packages
UNPRIVILEGED_TESTS := tests/integration/test_node_daemon.py
test-unprivileged: deps
	@if [ "$$(id -u)" = 0 ]; then \
		site=$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
		cd /tmp && runuser -u nobody -- env HOME=/tmp DECKARD_FORBID_SKIP=1 PYTHONPATH=$(CURDIR)/src:$$site \
			/usr/bin/python3 -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml \
			$(addprefix $(CURDIR)/,$(UNPRIVILEGED_TESTS)); \
	else DECKARD_FORBID_SKIP=1 $(VENV)/bin/pytest -q $(UNPRIVILEGED_TESTS); fi

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
