# The two commands a newcomer needs: `make run` and `make test`. Each sets up what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-web demo lint bench clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision are pinned in pyproject.toml; pip takes them from this machine's disk.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	touch $@

install: $(STAMP)

# One test process per core, a test file to each (its module fixtures, such as a worker
# process, stay shared), in collection order (tests/conftest.py puts the longest files
# first and gives each process one torch thread).
PYTEST_ARGS ?= -n auto --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The web tier alone (tests/web/: the Flask app, a database and a redis-server, no worker).
test-web: $(STAMP)
	$(BIN)/python -m pytest tests/web -q

demo: $(STAMP)
	mkdir -p var
	$(BIN)/stylequeue run examples/chelsea.jpg \
		shared/presets/starry-night.jpg --backbone vgg19-random --size 256 \
		--iterations 100 --log-every 20 -o var/demo.png

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole service on embedded defaults: a SQLite file and files under ./var, the Redis at
# STYLEQUEUE_REDIS_URL if one answers (else an embedded one), one worker, the web server on
# HOST:PORT (default 127.0.0.1:5000). Ctrl-C stops everything.
run: $(STAMP)
	$(BIN)/stylequeue serve

# Every figure in docs/benchmarks.md, side by side in one run each (about 35 minutes on
# 2 cores; bench/api.py needs wrk). The GPU figures come from bench/gpu.sh on a GPU machine.
bench: $(STAMP)
	$(BIN)/python bench/service.py --update docs/benchmarks.md
	$(BIN)/python bench/api.py --update docs/benchmarks.md
	$(BIN)/python bench/throughput.py --update docs/benchmarks.md
	$(BIN)/python bench/batching.py --update docs/benchmarks.md
	$(BIN)/python bench/first_picture.py --update docs/benchmarks.md
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache *.egg-info
