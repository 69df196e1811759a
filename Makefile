# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo venv clean chaos bench dist install uninstall test-cluster demo-cluster cluster-packages coverage

venv: $(STAMP)

# Reinstall only when the project's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev,yolo]'  # not -q: torch takes minutes, pip shows its progress (a few lines a package)
	touch $(STAMP)

# Every test but the loopback cluster's (make test-cluster).
test: $(STAMP)
	$(PY) -m pytest -q -m "not cluster"

# The inner loop: no real gpuguardd or job process, nothing slow (tests/README.md).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not slow and not cluster"

demo: $(STAMP)
	$(PY) -m gpuguard.demo

# The loopback cluster (lab/): Slurm n1 and n2, SeaweedFS, a gpuguardd per node; runs as root.
test-cluster: $(STAMP) cluster-packages
	$(PY) -m pytest -q -m cluster

demo-cluster: $(STAMP) cluster-packages
	$(PY) -m lab.demo_cluster

# Slurm and munge from apt when slurmctld is missing and we are root (else the cluster tests skip, saying why).
cluster-packages:
	@test -x /usr/sbin/slurmctld || [ "$$(id -u)" -ne 0 ] || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge; }

chaos: $(STAMP)
	$(PY) bench/chaos.py --long

# Every measured table of docs/BENCHMARKS.md, rewritten in place (about 31 min on the 2-core VM,
# 2026-12-01).
bench: $(STAMP) cluster-packages
	$(PY) bench/footprint.py --write-docs
	$(PY) bench/detection.py --samples 30 --write-docs
	$(PY) bench/store_growth.py --write-docs
	$(PY) bench/control_plane.py --write-docs
	$(PY) bench/resume.py --write-docs
	$(PY) bench/standby.py --write-docs
	$(PY) bench/hostcopy.py --write-docs
	$(PY) bench/storage.py --write-docs
	$(PY) bench/failover.py --write-docs

# Install as a systemd service (docs/DEPLOY.md): `make dist`, then as root `make install`.
# DESTDIR=/some/root installs under that root; INSTALL_ARGS and UNINSTALL_ARGS go to the scripts
# (deploy/install.sh --help, deploy/uninstall.sh --purge).
DIST_VENV := build/dist-venv

# A wheel and an sdist in dist/, built by `build` in a venv of its own: no torch on a GPU box.
dist: $(DIST_VENV)/.installed
	rm -rf dist
	$(DIST_VENV)/bin/python -m build --outdir dist .

$(DIST_VENV)/.installed:
	test -x $(DIST_VENV)/bin/python || $(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install -q 'build==1.6.1'  # the pin of the dev extra
	touch $@

install:
	DESTDIR='$(DESTDIR)' bash deploy/install.sh $(INSTALL_ARGS)

uninstall:
	DESTDIR='$(DESTDIR)' bash deploy/uninstall.sh $(UNINSTALL_ARGS)

# Line coverage of gpuguard/ from the whole suite, the daemons and CLIs the tests start
# included ([tool.coverage] in pyproject); docs/RELIABILITY.md "Coverage" has the last figures.
coverage: $(STAMP)
	rm -rf build/coverage && mkdir -p build/coverage
	$(PY) -m coverage run -m pytest -q -m 'not cluster' -p no:cacheprovider || true
	$(PY) -m coverage combine -q
	$(PY) -m coverage report --sort=cover | tee build/coverage/report.txt

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
