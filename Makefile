# lowcon: `make demo` runs the main job on embedded data; `make test` runs the test suite.
# Both install what they need into .venv first (offline on a machine that has the PyTorch wheels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MINUTES ?= 3

.PHONY: install test demo demo-translate bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev,fid]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

demo: install
	$(VENV)/bin/lowcon demo dehaze --minutes $(MINUTES)

demo-translate: install
	$(VENV)/bin/lowcon demo translate --minutes $(MINUTES)

bench: install
	$(PY) benchmarks/bench_aecrnet.py
	$(PY) benchmarks/bench_translation.py

clean:
	rm -rf runs build *.egg-info
