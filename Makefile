# qtool: `make demo` and `make test` do all of their set-up on a fresh machine.
# With no virtual environment active, one is created in .venv and the package is installed
# into it (the C kernels are compiled by that install).

SHELL := /bin/bash
PYTHON_SYS ?= python3

ifdef VIRTUAL_ENV
  VENV := $(VIRTUAL_ENV)
else
  VENV := $(CURDIR)/.venv
endif
PY := $(VENV)/bin/python
# Every optional extra: the tests of Ray and OpenVINO run (CI fails rather than skips them).
EXTRAS ?= dev,bench,ray,openvino
STAMP := $(VENV)/.qtool-installed

.PHONY: install demo test test-fast bench lint native-test clean chromium

# Reinstall when the package definition or the C sources change.
$(STAMP): pyproject.toml $(wildcard setup.py) $(wildcard native/src/*.c native/include/*.h qtool/kernels/_build.py)
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)
	@echo "qtool is installed in $(VENV)/bin; put it on PATH with: source $(VENV)/bin/activate"

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# The suite runs twice: on the C kernels, then on their numpy twins (the fallback path).
test: $(STAMP)
	QTOOL_NATIVE=1 $(PY) -m pytest tests
	QTOOL_NATIVE=0 $(PY) -m pytest tests -k "not test_kernels"

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check qtool tests bench examples

# Debian's chromium, for the HTML report's browser test (skipped without it; CI installs it).
chromium:
	bash tests/install_chromium.sh

native-test:
	$(MAKE) -C native test

clean:
	rm -rf build *.egg-info qtool/kernels/_qtool_native*.so examples/out
