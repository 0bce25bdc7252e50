# The two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LVD := $(VENV)/bin/lvd
PIP := $(PY) -m pip install -q --disable-pip-version-check -c requirements/lock.txt -c requirements/torch-constraint.txt
STAMP := $(VENV)/.lvd-installed
DEMO_DIR ?= demo-data

.PHONY: demo calibrate-demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/no-deps.txt requirements/torch-constraint.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing lvd and its pinned packages into $(VENV) (pip's output: $(VENV)/pip-install.log)"
	$(PIP) -e '.[dev]' > $(VENV)/pip-install.log 2>&1 || (cat $(VENV)/pip-install.log; exit 1)
	$(PIP) --no-deps -r requirements/no-deps.txt >> $(VENV)/pip-install.log 2>&1 || (cat $(VENV)/pip-install.log; exit 1)
	$(PY) -m pip check > $(VENV)/pip-check.log 2>&1 || echo "pip check reports dependency conflicts: see $(VENV)/pip-check.log"
	touch $(STAMP)

# curation (tiny random-weight captioners and CLIP: no weights can be downloaded) -> its HTML report
# -> shards -> the tiny three-stage training chain -> a sample video, on CPU.
# Every step resumes, so running it again only redoes what is missing.
demo: $(STAMP)
	@echo "== 1/7 synthetic videos -> $(DEMO_DIR)/videos"
	@$(PY) -m curation.testing.synthetic $(DEMO_DIR)/videos > /dev/null
	@echo "== 2/7 lvd curate recipes/curation/demo.yaml (tiny random-weight stand-ins for the models)"
	@$(LVD) curate recipes/curation/demo.yaml --set inputs=[$(DEMO_DIR)/videos] --set output=$(DEMO_DIR)/run \
	    $$($(PY) -m curation.testing.tiny_models $(DEMO_DIR)/models)
	@echo "== 3/7 lvd report $(DEMO_DIR)/run"
	@$(LVD) report $(DEMO_DIR)/run
	@echo "== 4/7 lvd shards write"
	@$(LVD) shards write $(DEMO_DIR)/run $(DEMO_DIR)/shards --no-progress
	@echo "== 5/7 lvd train: tiny stage 1 (images)"
	@$(LVD) train recipes/train/tiny_stage1.yaml --set output=$(DEMO_DIR)/train/stage1 --set data.shards.shards=$(DEMO_DIR)/shards
	@echo "== 6/7 lvd train: tiny stages 2 (video) and 3 (fine-tuning)"
	@$(LVD) train recipes/train/tiny_stage2.yaml --set output=$(DEMO_DIR)/train/stage2 --set init_from=$(DEMO_DIR)/train/stage1 --set data.shards.shards=$(DEMO_DIR)/shards
	@$(LVD) train recipes/train/tiny_stage3.yaml --set output=$(DEMO_DIR)/train/stage3 --set init_from=$(DEMO_DIR)/train/stage2 --set data.shards.shards=$(DEMO_DIR)/shards
	@echo "== 7/7 lvd sample"
	@$(LVD) sample --model $(DEMO_DIR)/train/stage3 --prompt "a square moves across the frame" --size 32x56 --out $(DEMO_DIR)/sample.mp4
	@echo "demo done: report $(DEMO_DIR)/run/report.html, ledger $(DEMO_DIR)/run/ledger, shards $(DEMO_DIR)/shards, model $(DEMO_DIR)/train/stage3/model, video $(DEMO_DIR)/sample.mp4"

# After `make demo`: a tiny threshold calibration on the demo's clips (every usable one, in their own shards):
# proxies on filtered subsets, a baseline and random controls -> table, suggested thresholds, report page.
calibrate-demo: $(STAMP)
	@test -f $(DEMO_DIR)/run/funnel.json || { echo "no curation run in $(DEMO_DIR)/run: run make demo first"; exit 2; }
	$(LVD) shards write $(DEMO_DIR)/run $(DEMO_DIR)/shards-all --all-usable --no-progress
	$(LVD) calibrate recipes/calibrate/tiny.yaml --set shards=$(DEMO_DIR)/shards-all --set output=$(DEMO_DIR)/calibrate
	@echo "calibration done: table $(DEMO_DIR)/calibrate/results.md, page $(DEMO_DIR)/calibrate/report.html"

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not gpu"

bench: $(STAMP)
	$(LVD) bench curate --recipe recipes/curation/cpu_fast.yaml
	$(LVD) bench stages --tiny
	$(LVD) bench loader
	$(LVD) bench train --latents

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
