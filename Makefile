# The two commands a newcomer needs: `make run` and `make test`. Each sets up what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAMPLES ?= ../shared/images

.PHONY: run test lint bench clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision are pinned in pyproject.toml; pip takes them from this machine's disk.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Until the job service lands (issue 2/5), `make run` stylizes the sample photo on this
# machine with the offline backbone and writes var/demo.png.
run: $(STAMP)
	mkdir -p var
	$(BIN)/stylequeue run $(SAMPLES)/content/tubingen.jpg $(SAMPLES)/style/starry_night.jpg \
		--backbone vgg19-random --size 256 --iterations 100 --log-every 20 -o var/demo.png

bench: $(STAMP)
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache *.egg-info
