# moat: `make demo` and `make test` are all a newcomer needs (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# KServe pins grpcio/protobuf of its own, so the real upstream server used by the tests
# lives in a virtualenv of its own.
KSERVE_VENV := .venv-kserve
export MOAT_CACHE_DIR ?= $(CURDIR)/.cache/moat
export MOAT_STATE_DIR ?= $(CURDIR)/.cache/state
export MOAT_KSERVE_PYTHON ?= $(CURDIR)/$(KSERVE_VENV)/bin/python
# Debian packages: the real data, and the real servers the tests start.
SYSTEM_PACKAGES := dataset-fashion-mnist redis-server prometheus

.PHONY: setup system-deps test test-unit test-e2e demo protos zoo bench clean

setup: system-deps $(VENV)/.installed $(KSERVE_VENV)/.installed

system-deps:
	@missing=""; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

# torch and torchvision first, pinned to the pair that imports together on these machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(KSERVE_VENV)/.installed:
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q kserve==0.21.0
	touch $@

# Two pytest runs: moat's generated `inference` protos and tritonclient's both register
# `inference.*` in protobuf's global descriptor pool, so they cannot share one process.
# tests/unit and tests/integration drive the gateway with moat's own stubs; tests/evaluation (the
# attack suite, whose thieves are tritonclient clients) and tests/e2e treat it as a black box
# through the stock tritonclient.
test: setup
	$(MAKE) test-unit test-e2e

test-unit:
	$(BIN)/python -m pytest tests/unit tests/integration -q

test-e2e:
	$(BIN)/python -m pytest tests/evaluation tests/e2e -q

zoo: setup
	$(BIN)/python -m evaluation.zoo build fashion-classifier fashion-encoder

# The benchmarks on the models `make zoo` trained (the same MOAT_CACHE_DIR, so nothing is trained
# twice); BENCH_ARGS adds options, e.g. `make bench BENCH_ARGS="--scenarios overhead --rounds 7"`.
BENCH_OUT ?= bench-out
bench: zoo
	$(BIN)/moat bench --out $(BENCH_OUT) $(BENCH_ARGS)

demo: setup
	$(BIN)/python -m evaluation.zoo build fashion-classifier fashion-encoder
	$(BIN)/python -m evaluation.demo
	$(BIN)/moat evaluate --suite demo --out .cache/demo-report

protos: $(VENV)/.installed
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) $(KSERVE_VENV) .cache .pytest_cache
