# Quick start: `make demo` and `make test`; each sets up .venv first when needed.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo_output

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

# torch and torchvision are pinned to the releases on this machine's disk (a CUDA build; it
# runs on CPU too). The GPU images pin their own build in images/.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The whole Kubeflow pipeline on built-in demo data, through kfp.local on this CPU: shards
# (once) -> BYOL and Ladder-BYOL arms (pretraining, the three evaluations) -> one report that
# says, per stage and task, whether Ladder-BYOL's difference from BYOL is real.
demo: setup
	$(BIN)/ladder-siam demo-data --dest $(DEMO)/raw --images 600 --size 96
	$(BIN)/ladder-siam pipeline run-local --params configs/pipeline_demo.yaml \
	  --pipeline-root $(DEMO)/kfp --param data_output_uri=$(DEMO) \
	  --param data_source_uri=$(DEMO)/raw/imagefolder --param data_detection_uri=$(DEMO)/raw/coco \
	  --param data_segmentation_uri=$(DEMO)/raw/voc
	@echo "Report: $(DEMO)/runs/demo/report/index.html (Markdown: report.md beside it)"

test: setup
	$(BIN)/pytest

# The everyday tier (<= 3 min on 2 cores): no slow or integration tests. `make test` runs all.
test-fast: setup
	$(BIN)/pytest -m "not slow and not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
