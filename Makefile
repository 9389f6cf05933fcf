# hvnet: `make demo` and `make test` do all set-up themselves on a fresh Debian machine.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Debian packages the project needs, each named by a command it provides.
APT_NEEDS := ip:iproute2 ping:iputils-ping iperf3:iperf3 ethtool:ethtool gcc:gcc tshark:tshark

.PHONY: setup sysdeps peers demo test bench clean-cache clean-venv

setup: sysdeps $(STAMP)

sysdeps:
	@missing=""; \
	for pair in $(APT_NEEDS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Open vSwitch for the benchmark peers (hvnet bench e2e and its tests), installed as
# the bench installs it: Debian's package, its own service never started.
peers: setup
	$(PY) -c 'from hvnet import ovs; ovs.ensure_installed(print)' \
	  || echo "Open vSwitch is not installed: its tests will be skipped"

demo: setup
	$(VENV)/bin/hvnet demo

test: setup peers
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pytest -q bench --benchmark-enable --benchmark-only
	$(VENV)/bin/hvnet bench fastpath
	$(VENV)/bin/hvnet bench ring

# numba keys its cache by each function's own file: after editing a helper that
# kernels in other modules inline, drop the cache or they keep the old code.
clean-cache:
	find . -path ./$(VENV) -prune -o \( -name '*.nbi' -o -name '*.nbc' \) -print | xargs rm -f

clean-venv:
	rm -rf $(VENV)
