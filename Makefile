# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[worker,test]'
	touch $(STAMP)

venv: $(STAMP)

# Train configs/demo.yaml under the supervisor, then show its status.
demo: $(STAMP)
	$(BIN)/vit-supervisor start configs/demo.yaml
	$(BIN)/vit-supervisor status configs/demo.yaml || true

# Two test processes (one per core); each file's tests stay together in one of them.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests
