# Two entry points (see README): `make serve` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
IMAGE  ?= kernelbox-kernel:latest
# Where `make serve` runs kernels: local (bubblewrap) or docker; from the environment too.
KERNELBOX_BACKEND ?= local

.PHONY: serve test lint image bench clean

# The venv is rebuilt when a pyproject.toml changes. Both distributions are installed editable
# (client/: kernelbox and kernelbox_wire; the root: kernelbox_server). uv makes the install
# fast; pip is the fallback.
# Bytecode is compiled now: sandboxed kernels see the environment read-only, and without .pyc
# files each one would compile the data stack again (seconds per start).
$(VENV)/.installed: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode -e ./client -e '.[dev]' || $(PY) -m pip install -q -e ./client -e '.[dev]'
	touch $@

# The local backend sandboxes kernels with bubblewrap: installed here when missing and root,
# else said (the service then starts without the sandbox, and says so too).
serve: $(VENV)/.installed
	@[ "$(KERNELBOX_BACKEND)" != local ] || command -v bwrap >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; } || true; \
		else \
			echo "bubblewrap is not installed: kernels will NOT be sandboxed (sudo apt-get install bubblewrap)"; \
		fi; }
	@echo "the kernelbox command is $(VENV)/bin/kernelbox (or: . $(VENV)/bin/activate)"
	$(VENV)/bin/kernelbox serve --backend $(KERNELBOX_BACKEND)

# Docker tests run when an engine is reachable (the kernel and service images are built first; a
# rebuild with nothing changed takes seconds). KERNELBOX_REQUIRE_DOCKER=1 turns a missing engine
# into a failure.
test: $(VENV)/.installed
	@if $(PY) -c "import docker; docker.from_env().ping()" 2>/dev/null; then \
		KERNEL_IMAGE=$(IMAGE) ./scripts/build-images.sh; \
	else echo "no Docker engine reachable: Docker tests will skip"; fi
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	KERNELBOX_IMAGE=$(IMAGE) $(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

image:
	./scripts/build-kernel-image.sh $(IMAGE)

# The figures in docs/benchmarks.md (several minutes; run on a quiet machine).
bench: $(VENV)/.installed
	$(PY) -m bench.engine --backends local,docker
	$(PY) -m bench.service
	$(PY) -m bench.service --backend docker --sessions 32 --port 8742
	$(PY) -m bench.runcode
	$(PY) -m bench.isolation_local
	$(PY) -m bench.isolation_docker --plot docs/isolation_docker.png
	$(PY) -m bench.fork_cost
	$(PY) -m bench.sdk_concurrency

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
