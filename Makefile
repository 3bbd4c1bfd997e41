# signserve: `make serve` serves the shipped models, `make test` runs the suite; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned and installed first, from pip's local wheel cache, so no resolver fetches another build.
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= cnn
EPOCHS ?= $(if $(filter detector,$(MODEL)),32,20)  # the trainers' defaults; docs/training.md has the shipped runs'
ARGS   ?=

.PHONY: setup test test-container serve train evaluate bench detect-cluster container-up container-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# one pytest worker per core, each test file on one worker (its module fixtures start once)
TEST_WORKERS ?= auto
test: setup
	$(BIN)/python -m pytest -m "not container" -n $(TEST_WORKERS) --dist loadfile

# the image built and served by Docker or podman (tests/test_container.py; needs an engine, see docs/docker.md)
test-container: setup
	$(BIN)/python -m pytest -m container

serve: setup
	SIGNSERVE_HOST=$(HOST) SIGNSERVE_PORT=$(PORT) $(BIN)/python -m app

train: setup
	bash training/slurm/submit.sh $(MODEL) $(EPOCHS) $(ARGS)

# signserve detect over INPUT as a Slurm job array of SHARDS tasks and a merge job (batch/slurm/submit.sh)
SHARDS ?= 4
detect-cluster: setup
	@test -n "$(INPUT)" -a -n "$(OUTPUT)" || { echo "usage: make detect-cluster INPUT=DIR OUTPUT=FILE [SHARDS=N]" >&2; exit 2; }
	bash batch/slurm/submit.sh "$(INPUT)" "$(OUTPUT)" $(SHARDS) $(ARGS)

evaluate: setup
	$(BIN)/python -m training.evaluate --checkpoint models/checkpoints/$(MODEL).pt

bench: setup
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,bench]'
	$(BIN)/python -m bench
	$(BIN)/python -m bench.detect

# docker/compose.yaml on $(HOST):$(PORT) with Docker, or podman where there is no Docker daemon
# (docker/container.sh: builds the image, starts the api service, waits for its healthcheck).
container-up:
	SIGNSERVE_BIND=$(HOST) SIGNSERVE_PORT=$(PORT) bash docker/container.sh up

container-down:
	bash docker/container.sh down

clean:
	rm -rf .cache .pytest_cache logs artifacts
