# Quick start: `make demo` and `make test`; each sets up .venv first when needed.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo_output

.PHONY: setup demo test lint format clean

setup: $(STAMP)

# torch and torchvision are pinned to the releases on this machine's disk (a CUDA build; it
# runs on CPU too). The GPU images pin their own build in images/.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The whole flow on built-in demo data, on CPU: data -> shards -> pretraining of BYOL and
# Ladder-BYOL -> the three evaluations of each -> one report comparing them.
SETS    := $(DEMO)/datasets
METHODS := byol ladder-byol
demo: setup
	$(BIN)/ladder-siam demo-data --dest $(DEMO)/raw --images 600 --size 96
	$(BIN)/ladder-siam prepare-shards --source $(DEMO)/raw/imagefolder --dest $(SETS)/demo --layout imagefolder --shard-size 100 --workers 2
	$(BIN)/ladder-siam prepare-shards --source $(DEMO)/raw/coco --dest $(SETS)/demo-coco --layout coco --shard-size 100 --workers 2
	$(BIN)/ladder-siam prepare-shards --source $(DEMO)/raw/voc --dest $(SETS)/demo-voc --layout voc --shard-size 100 --workers 2
	set -e; for method in $(METHODS); do \
	  run=$(DEMO)/runs/$$method; \
	  $(BIN)/ladder-siam pretrain --config configs/tiny_cpu.yaml --method $$method --shards $(SETS)/demo --out $$run; \
	  $(BIN)/ladder-siam linear-probe --preset tiny --backbone $$run/backbone.pt --train $(SETS)/demo/train --val $(SETS)/demo/val --out $$run/eval/linear_probe; \
	  $(BIN)/ladder-siam finetune-detection --preset tiny --backbone $$run/backbone.pt --train $(SETS)/demo-coco/train --val $(SETS)/demo-coco/val --out $$run/eval/detection; \
	  $(BIN)/ladder-siam finetune-segmentation --preset tiny --backbone $$run/backbone.pt --train $(SETS)/demo-voc/train --val $(SETS)/demo-voc/val --out $$run/eval/segmentation; \
	done
	$(BIN)/ladder-siam report --runs $(foreach m,$(METHODS),$(DEMO)/runs/$(m)) --out $(DEMO)/report --analysis-images $(SETS)/demo/val
	@echo "Report: $(DEMO)/report/index.html (Markdown: $(DEMO)/report/report.md)"

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
