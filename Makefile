# aurora_fx: `make demo` and `make test` each create .venv when missing, install the locked versions
# (requirements.lock: every direct and transitive package the suite passed with), and run.
# `make lock` regenerates the lock with pip-tools; `make test-latest` installs the newest versions the
# ranges in pyproject.toml allow into .venv-latest and runs the suite there (not in CI).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
# Every pip command carries the torch/torchvision pins (an unpinned command can
# silently swap torch builds).
PIN    := -c constraints.txt
STAMP  := $(VENV)/.aurora_fx-installed
LOCK   := requirements.lock
LATEST ?= .venv-latest
LOCKENV ?= .venv-lock
PYTEST_ARGS ?=
VERSIONS := import torch, timm, transformers, onnxruntime, peft; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| timm', timm.__version__, '| onnxruntime', onnxruntime.__version__)

.PHONY: demo test lint bench clean install lock test-latest clients mutants

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIN) -r $(LOCK)
	$(PIP) install $(PIN) --no-deps -e .
	$(PY) -c "$(VERSIONS)"
	touch $(STAMP)

# The lock: pip-tools resolves pyproject.toml (extras dev and data) under the torch pins.
lock:
	test -x $(LOCKENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCKENV) && $(LOCKENV)/bin/pip -q install pip-tools)
	$(LOCKENV)/bin/pip-compile -q --upgrade --extra dev --extra data $(PIN) --strip-extras --no-emit-index-url \
		--no-emit-find-links -o $(LOCK) pyproject.toml

# The newest versions the ranges allow (a fresh .venv-latest each time), then the whole suite.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip -q --disable-pip-version-check install $(PIN) --upgrade -e '.[dev,data]'
	$(LATEST)/bin/python -c "$(VERSIONS)"
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/aurora-fx demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check aurora_fx tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/bench_adapter.py

# The serving folders loaded by the real clients (vLLM, optimum-onnx, llama.cpp), each in its own virtualenv
# under ~/.cache/aurora_fx/clients (built once: about 25 minutes); writes benchmarks/results/clients.json.
clients: $(STAMP)
	$(PY) benchmarks/clients.py

# Plant each bug of tests/mutation/mutants.py in a copy of the tree and run its tests (not in CI; ~20 minutes).
mutants: $(STAMP)
	$(PY) tests/mutation/run.py

clean:
	rm -rf $(VENV) $(LATEST) $(LOCKENV) .pytest_cache .hypothesis
