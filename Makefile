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

demo: setup
	$(BIN)/ladder-siam demo-data --dest $(DEMO)/raw --images 600 --size 96
	$(BIN)/ladder-siam prepare-shards --source $(DEMO)/raw/imagefolder --dest $(DEMO)/datasets/demo --layout imagefolder --shard-size 100 --workers 2
	$(BIN)/ladder-siam prepare-shards --source $(DEMO)/raw/coco --dest $(DEMO)/datasets/demo-coco --layout coco --shard-size 100 --workers 2
	$(BIN)/ladder-siam prepare-shards --source $(DEMO)/raw/voc --dest $(DEMO)/datasets/demo-voc --layout voc --shard-size 100 --workers 2
	$(BIN)/ladder-siam pretrain --config configs/tiny_cpu.yaml --shards $(DEMO)/datasets/demo --out $(DEMO)/runs/ladder-byol
	@echo "Demo datasets are in $(DEMO)/datasets (manifest.json in each)."
	@echo "Demo pretraining run: $(DEMO)/runs/ladder-byol (backbone.pt, train_log.jsonl, checkpoints/)."

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
