# orayboxvpn / mpvpn developer Makefile.
#   make demo   - the main job (see README)
#   make test   - install everything into .venv and run the whole suite
#   make bench  - run the benchmarks under bench/
#   make ipk    - build dist/orayboxvpn_<ver>_all.ipk, dist/luci-app-mpvpn_<ver>_all.ipk, luci-i18n-mpvpn-zh-cn_<ver>_all.ipk
#                 and the monitoring packages prometheus-node-exporter-lua-orayboxvpn_<ver>_all.ipk,
#                 orayboxvpn-collectd_<ver>_all.ipk (docs/monitoring.md)
#                 (opkg: OpenWrt 24.10 and older; no SDK needed, see docs/openwrt.md)
#   make apk    - build dist/orayboxvpn-<ver>.apk, dist/luci-app-mpvpn-<ver>.apk, luci-i18n-mpvpn-zh-cn-<ver>.apk,
#                 prometheus-node-exporter-lua-orayboxvpn-<ver>.apk, orayboxvpn-collectd-<ver>.apk
#                 (apk-tools v3: OpenWrt 25.12 and later; no SDK needed)
#   OPENWRT=24.10|25.12 picks the target release (its python3: 3.11 | 3.13);
#                 default 24.10 for ipk, 25.12 for apk
#   make test-openwrt - the OpenWrt packaging tests (a real OpenWrt rootfs in Docker
#                 when a Docker engine runs, otherwise skipped with the reason)
# (The OpenWrt package recipes live in package/*/Makefile; make ipk/apk read them.)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Debian packages the suite and the demo use (commands checked before installing).
# .ci/apt-get waits (up to 10 min) for another apt/dpkg process to let go of its lock.
SYSDEPS_CMDS := ip:iproute2 nft:nftables tc:iproute2 ping:iputils-ping iperf3:iperf3 turnserver:coturn conntrack:conntrack \
                msgfmt:gettext xgettext:gettext lua5.1:lua5.1 collectd:collectd-core

.PHONY: all venv sysdeps test demo bench ipk apk test-openwrt clean fastpath

all: test

sysdeps:
	@missing=""; for pair in $(SYSDEPS_CMDS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || [ -x /sbin/$$cmd ] || missing="$$missing $$pkg"; done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; .ci/apt-get update -q && DEBIAN_FRONTEND=noninteractive .ci/apt-get install -y -q $$missing; \
	  else echo "warning: missing system packages:$$missing (install them as root)"; fi; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) sysdeps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,agent,bench]'
	@# atheris (coverage-guided fuzzing, tests/fuzz) has wheels for common Linux
	@# Pythons; without one the fuzz run is skipped with a printed reason.
	$(PY) -m pip install -q atheris || echo "atheris unavailable: the fuzz run will be skipped"
	touch $@

venv: $(STAMP)

# The optional C loops of the data path (src/mpvpn/core/_fastpath.c), built in
# place next to the Python sources; without a compiler everything runs the
# pure-Python path and the C-vs-Python tests are skipped with the reason.
# MPVPN_REQUIRE_FASTPATH=1 (.ci/run sets it): a failed build fails, and the
# suite refuses to run without the loops instead of skipping those tests.
fastpath: $(STAMP)
	@if [ "$${MPVPN_REQUIRE_FASTPATH:-0}" = 1 ]; then $(PY) -m mpvpn.tools.fastpath_build --build; \
	else $(PY) -m mpvpn.tools.fastpath_build --build || echo "C loops not built: the pure-Python path will be used"; fi

test: $(STAMP) fastpath
	$(PY) -m pytest

# The main job: two sites, three carriers, the real agent, in network
# namespaces on this machine (root).  Without root: the in-memory demo.
demo: $(STAMP) fastpath
	@if [ "$$(id -u)" = 0 ] && ip netns list >/dev/null 2>&1; then \
	  $(PY) tests/labdemo.py; \
	else \
	  echo "(not root: network namespaces unavailable, running the in-memory SMPU demo)"; \
	  $(PY) -m mpvpn.tools.demo; \
	fi

bench: $(STAMP) fastpath
	$(PY) bench/core.py
	$(PY) bench/loss.py
	$(PY) bench/agent.py
	$(PY) bench/idle.py
	$(PY) bench/aggregate.py
	$(PY) bench/cost.py

ipk: $(STAMP)
	$(PY) -m mpvpn.tools.ipk --out dist --release $(or $(OPENWRT),24.10)

apk: $(STAMP)
	$(PY) -m mpvpn.tools.apk --out dist --release $(or $(OPENWRT),25.12)

test-openwrt: $(STAMP)
	$(PY) -m pytest -rs tests/test_initscript.py tests/test_ipk.py tests/test_apk.py tests/test_pair.py tests/test_package_makefiles.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
