# The two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c requirements/lock.txt -c requirements/torch-constraint.txt
STAMP := $(VENV)/.lvd-installed
DEMO_DIR ?= demo-data

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/no-deps.txt requirements/torch-constraint.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps -r requirements/no-deps.txt
	$(PY) -m pip check || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m curation.synthetic $(DEMO_DIR)/videos
	$(VENV)/bin/lvd curate recipes/curation/demo.yaml --set output=$(DEMO_DIR)/run

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not gpu"

bench: $(STAMP)
	$(VENV)/bin/lvd bench curate

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
