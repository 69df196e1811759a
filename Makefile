# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo venv clean chaos bench

venv: $(STAMP)

# Reinstall only when the project's declared dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,yolo]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m gpuguard.demo

chaos: $(STAMP)
	$(PY) bench/chaos.py --long

# Every measured table of docs/BENCHMARKS.md, rewritten in place (11 min 17 s in all on the 2-core VM).
bench: $(STAMP)
	$(PY) bench/footprint.py --write-docs
	$(PY) bench/detection.py --samples 30 --write-docs
	$(PY) bench/store_growth.py --write-docs
	$(PY) bench/control_plane.py --write-docs
	$(PY) bench/resume.py --write-docs

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
