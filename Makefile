# EdgeMesh — one command to set up, run, test and build.
#   make run      set up, then build the demo world in network namespaces (root) and leave it up
#   make demo-down   tear the demo world down
#   make agent    set up, then run one agent on examples/ here (no cluster, no iptables, no root)
#   make test     set up, then run the whole test suite
#   make chaos    the fault-injection suite's long version (tests/chaos/)
#   make binary   the PyInstaller onefile binary in dist/edgemesh
#   make onedir   the PyInstaller onedir build in dist/edgemesh-onedir/
#   make binary-arm64 / binary-armv7   the same for another CPU, built under qemu (root)
#   make portable-CPU   the libc-independent build for CPU (amd64, arm64, armv7)
#   make deb / ipk      this machine's .deb / OpenWrt .ipk; packages-CPU for another CPU
#   make release        every binary and package for every CPU, with SHA256SUMS, in dist/
#   make test-devices   build what the device tests need, then run them (tests/devices/)
#   make fuzz     every parser fuzz target for a million inputs (atheris), one table
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := iptables iproute2 dnsutils curl iperf3 dnsperf dnsmasq-base haproxy nginx-light \
	libnginx-mod-stream wrk openssl socat tcpdump tshark conntrack bridge-utils procps psmisc kmod \
	patchelf busybox-static faketime

.PHONY: setup system-deps run agent demo-down test test-fast lint binary onedir bench bench-quick \
	clean chaos soak binary-arm64 binary-armv7 portable-amd64 portable-arm64 portable-armv7 \
	packages-amd64 packages-arm64 packages-armv7 deb ipk apk release test-devices device-deps

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

# Fault injection under traffic, long version (tests/chaos/): each fault 3 times, the agent
# killed -9 100 times, the API down 60 s; prints the table and writes .state/chaos-report.json.
# `make test` runs the short version (each fault once, 5 kills, ~3 min).
chaos: setup
	EDGEMESH_CHAOS=long $(BIN)/python -m pytest -q tests/chaos tests/unit/test_crash_safe_state.py

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

# 10,000 proxied connections held 10 minutes through a ClusterIP, then through the tunnel
# (root; ~25 min); tests/e2e/test_soak.py runs 30 s per path in `make test`
.PHONY: soak
soak: setup
	$(BIN)/python -m bench.soak --conns 10000 --seconds 600 --interval 10

# every benchmark briefly (~5 min on 2 cores): one ratio table, bench/results/quick.json;
# `$(BIN)/python -m bench.table --write` then regenerates the README's benchmark table from it
bench-quick: setup
	$(BIN)/python -m bench.quick

clean:
	rm -rf dist build-pyinstaller .state

# ---- other CPUs, libc-independent builds, packages (packaging/foreign/, packaging/README.md) ----
# Emulated builds run in Debian roots kept in build-foreign/ (git-ignored; `make clean` keeps
# them): cold, arm64 takes ~7 min and armv7 ~27 min on 2 cores (armv7 compiles 7 wheels once);
# warm, ~4-6 min each.
FOREIGN ?= build-foreign
CPUS ?= amd64 arm64 armv7
DEVICE_PACKAGES := qemu-user-static binfmt-support debootstrap patchelf busybox-static dpkg

# what the device builds and tests use (busybox-static: the fake OpenWrt root's shell)
device-deps:
	@missing=$$(for p in $(DEVICE_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; \
	fi
SYSROOT_amd64 := /
SYSROOT_arm64 := $(FOREIGN)/rootfs-arm64
SYSROOT_armv7 := $(FOREIGN)/rootfs-armhf
ONEDIR_amd64 := dist/edgemesh-onedir
ONEDIR_arm64 := dist/edgemesh-linux-arm64-onedir
ONEDIR_armv7 := dist/edgemesh-linux-armv7-onedir

binary-arm64 binary-armv7: binary-%: device-deps
	packaging/foreign/build.sh $*

# onedir + its own glibc and loader (patchelf): runs on musl, on older glibc, with no libc at
# all; installs at /usr/lib/edgemesh (tar -xzf ... -C /), which the packages use
portable-amd64: onedir device-deps
portable-arm64: binary-arm64
portable-armv7: binary-armv7
portable-amd64 portable-arm64 portable-armv7: portable-%:
	$(PY) packaging/foreign/portable.py $(ONEDIR_$*) $(SYSROOT_$*) dist/edgemesh-linux-$*-portable
	tar -cf - --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
		-C dist/edgemesh-linux-$*-portable usr | gzip -9n > dist/edgemesh-linux-$*-portable.tar.gz

packages-amd64 packages-arm64 packages-armv7: packages-%: portable-%
	$(PY) packaging/foreign/mkpkg.py deb dist/edgemesh-linux-$*-portable $* dist
	$(PY) packaging/foreign/mkpkg.py ipk dist/edgemesh-linux-$*-portable $* dist
	$(PY) packaging/foreign/mkpkg.py apk dist/edgemesh-linux-$*-portable $* dist

# .apk: APK v3, what OpenWrt 25.12+ installs (`apk add --allow-untrusted`: unsigned)
deb ipk apk: portable-amd64
	$(PY) packaging/foreign/mkpkg.py $@ dist/edgemesh-linux-amd64-portable amd64 dist

# RELEASE_CPUS=amd64 arm64 leaves armv7 out (its cold build is the long one)
RELEASE_CPUS ?= $(CPUS)
release: binary $(addprefix packages-,$(RELEASE_CPUS))
	cp dist/edgemesh dist/edgemesh-linux-amd64
	cd dist && sha256sum $(addprefix edgemesh-linux-,$(RELEASE_CPUS)) \
		$(addsuffix -portable.tar.gz,$(addprefix edgemesh-linux-,$(RELEASE_CPUS))) \
		edgemesh_*.deb edgemesh_*.ipk edgemesh-*.apk > SHA256SUMS
	cat dist/SHA256SUMS

# The device tests against what `release` built (they skip what is missing, saying which
# target builds it); `make test` runs them too, but never builds.
test-devices: setup release
	$(BIN)/python -m pytest -q -m devices tests/devices

# ---- fuzzing (tests/fuzz/; README "Fuzzing (make fuzz)") ----
# Every atheris target for FUZZ_RUNS inputs, two at a time, then one table (inputs, coverage,
# crashes, hangs); fuzz-corpus minimises what they found into tests/fuzz/corpus/ (commit it).
FUZZ_RUNS ?= 1000000
.PHONY: fuzz fuzz-corpus
fuzz: setup
	$(BIN)/python -m tests.fuzz.run --runs $(FUZZ_RUNS) --jobs 2

fuzz-corpus: setup
	$(BIN)/python -m tests.fuzz.run --merge
