# One entry point for newcomers and CI. `make serve` starts the whole system on the embedded tiny
# checkpoint; `make test` runs the formatter, the linter and the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_WHEEL_DIR ?= /opt/wheels
MODEL_DIR ?= .cache/tiny-kimi-k25
HOST ?= 127.0.0.1
PORT ?= 30000

.PHONY: install serve test lint proto checkpoint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and explicitly: the CPU build, so that nothing pulls a CUDA build.
	$(PY) -m pip install -q --find-links $(TORCH_WHEEL_DIR) "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

proto: install
	$(PY) -m proto.generate

$(MODEL_DIR)/config.json: | install
	$(VENV)/bin/kimiserve make-tiny-checkpoint $(MODEL_DIR)

checkpoint: $(MODEL_DIR)/config.json

serve: install checkpoint
	$(VENV)/bin/kimiserve up --model-path $(MODEL_DIR) --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .cache
