# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := supervisor worker tests bench

.PHONY: demo test unit lint venv

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

# The gates: lint and format check on all Python code, then types (files and strictness in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy

# Gates first, then three test processes that steal work from each other (worksteal: with whole files per
# process one core sat idle at the end). Three on two cores: the SLURM tests spend minutes waiting for the
# scheduler's 30 s checks, and a third process keeps both cores busy meanwhile.
# pytest's exit 5 (no tests collected: a bad -m or PYTEST_ADDOPTS) is a failure, said so.
test: lint
	$(BIN)/python -m pytest -q -n 3 --dist worksteal tests || { rc=$$?; \
	  [ $$rc -ne 5 ] || echo "make test: pytest collected no tests (exit 5); that is a failure" >&2; exit $$rc; }

# The unit tests alone (no real worker or supervisor processes): seconds.
unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" tests
