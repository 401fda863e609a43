# aurora_fx: `make demo` and `make test` each create .venv when missing, install, and run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
# Every pip command carries the torch/torchvision pins (an unpinned command can
# silently swap torch builds).
PIN    := -c constraints.txt
STAMP  := $(VENV)/.aurora_fx-installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIN) torch==2.14.1 torchvision==0.29.1
	$(PIP) install $(PIN) -e '.[dev,data]'
	$(PY) -c "import torch, timm, transformers, onnxruntime; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| timm', timm.__version__, '| onnxruntime', onnxruntime.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/aurora-fx demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check aurora_fx tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/bench_adapter.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
