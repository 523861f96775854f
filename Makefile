# EdgeMesh — one command to set up, run, test and build.
#   make run      set up, then build the demo world in network namespaces (root) and leave it up
#   make demo-down   tear the demo world down
#   make agent    set up, then run one agent on examples/ here (no cluster, no iptables, no root)
#   make test     set up, then run the whole test suite
#   make binary   the PyInstaller onefile binary in dist/edgemesh
#   make onedir   the PyInstaller onedir build in dist/edgemesh-onedir/
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := iptables iproute2 dnsutils curl iperf3 dnsperf dnsmasq-base haproxy nginx-light \
	libnginx-mod-stream wrk openssl socat tcpdump tshark conntrack bridge-utils procps psmisc kmod

.PHONY: setup system-deps run agent demo-down test test-fast lint binary onedir bench clean

setup: system-deps $(STAMP)

# Debian packages the tests and benchmarks use; installed only when missing and we are root.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null; \
	  else echo "note: missing Debian packages (tests needing them skip): $$missing"; fi; \
	fi

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,build,dev]'
	touch $(STAMP)

# The quick start's cluster key: generated once into .state/psk (never a literal default).
.state/psk:
	mkdir -p -m 0700 .state
	umask 077 && $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > $@

# The quick start: two NAT sites, a cloud node, a relay, a gateway, an agent per node and the
# example services in namespaces emdemo-* (examples/demo/world.py); it stays up until demo-down.
run: setup
	$(BIN)/python -m examples.demo.world up

demo-down:
	$(BIN)/python -m examples.demo.world down

# One agent on this machine, on every example (tests/e2e/test_quickstart.py runs these flags).
agent: setup .state/psk
	$(BIN)/edgemesh agent --manifests examples/ --no-iptables --state-dir .state \
		--psk-file .state/psk --dns-listen 127.0.0.1:1053 \
		--node-name $${NODE_NAME:-edge-node-1}

# The whole suite from the source tree, then a smoke subset against the frozen binary
# (tests/test_binary.py builds dist/edgemesh when it is missing or older than the sources).
SMOKE_TESTS := tests/e2e/test_dns.py::test_agent_in_a_namespace_on_edgemesh0 \
	tests/e2e/test_tunnel.py::test_cross_site_services_by_name_through_the_relay \
	tests/e2e/test_gateway.py::test_host_path_rewrite_headers_and_cross_namespace

test: setup
	$(BIN)/python -m pytest -q tests
	@if [ -x dist/edgemesh ]; then \
	  echo "smoke tests against the frozen binary dist/edgemesh"; \
	  EDGEMESH_BIN=$(CURDIR)/dist/edgemesh $(BIN)/python -m pytest -q $(SMOKE_TESTS); \
	else echo "dist/edgemesh was not built: frozen-binary smoke tests not run"; exit 1; fi

test-fast: setup
	$(BIN)/python -m pytest -q -m "not netns and not binary and not slow" tests

lint: setup
	$(BIN)/ruff check edgemesh tests bench examples

# PYTHONHASHSEED=0: set and frozenset constants marshal in one order, so the same sources and
# pinned dependencies give a byte-identical binary
binary: setup
	PYTHONHASHSEED=0 $(BIN)/pyinstaller --noconfirm --clean --log-level ERROR --distpath dist \
		--workpath build-pyinstaller packaging/edgemesh.spec

# the onedir build: dist/edgemesh-onedir/edgemesh (starts faster; no unpacking to /tmp)
onedir: setup
	PYTHONHASHSEED=0 EDGEMESH_BUNDLE=onedir $(BIN)/pyinstaller --noconfirm --clean --log-level ERROR \
		--distpath dist --workpath build-pyinstaller/onedir packaging/edgemesh.spec

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf dist build-pyinstaller .state
