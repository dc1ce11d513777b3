#!/usr/bin/env bash
# The GPU check, in one command, for the device machine (python3 with CUDA torch,
# transformers, grpcio, numpy, scikit-learn, pytest, matplotlib; no network; no
# SmolLM2 GGUF). From the repository root:
#
#   scripts/device-check.sh            # results in $OUT (default bench-results/device-check/)
#
# 1. installs the wheels the machine lacks from .device-wheels/ (`make device-wheels`
#    fills it here; carry it: it is ignored by git) into a site folder of its own;
# 2. makes `arserve` importable without installing it (links services/ and the SDK);
# 3. runs `make test-gpu`'s selection with ARSERVE_TEST_DEVICE (default cuda), less
#    the tests that need the SmolLM2 GGUF (marked `smollm2` by tests/conftest.py);
# 4. runs the GPU benchmark (arserve bench --suite gpu) and copies gpu.json, its plot
#    and the logs to $OUT.
# Budget: under 8 minutes (tests ~TEST_TIMEOUT, bench ~BENCH_TIMEOUT). Rehearse it on a
# CPU with: ARSERVE_TEST_DEVICE=cpu BENCH_ARGS="--device cpu --max-tokens 8 ..." OUT=/tmp/x
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench-results/device-check}
SITE=${DEVICE_SITE:-/tmp/arserve-device-site}
PY=${PYTHON:-python3}
TEST_DEVICE=${ARSERVE_TEST_DEVICE:-cuda}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
BENCH_ARGS=${BENCH_ARGS:---device cuda}
mkdir -p "$OUT" "$SITE"
start=$(date +%s)
stamp() { echo "[device-check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/device-check.log"; }

# 1. the missing wheels, into a site folder that comes first on the path (pinned grpcio and
#    protobuf: the generated stubs check their versions)
WHEELS=${DEVICE_WHEELS:-.device-wheels}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl >>"$OUT/device-check.log" 2>&1 || { stamp "wheel install failed"; exit 1; }
else
  stamp "no .device-wheels/ (run make device-wheels, carry .device-wheels): using what is installed"
fi
# 2. arserve and its SDK by links (the machine has no network to build an install)
ln -sfn "$ROOT/services" "$SITE/arserve"
ln -sfn "$ROOT/clients/python/arserve_client" "$SITE/arserve_client"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch, transformers, grpc, google.protobuf as pb, arserve
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "grpcio", grpc.__version__, "protobuf", pb.__version__,
      "arserve", arserve.__file__)
EOF
stamp "environment ready"

# 3. the device-agnostic suite on the device (make test-gpu's selection, one place: the Makefile)
GPU_TESTS=$(sed -n 's/^GPU_TESTS := //p' Makefile)
ARSERVE_TEST_DEVICE=$TEST_DEVICE timeout "$TEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider -m "not smollm2" \
  --durations=15 $GPU_TESTS >"$OUT/test-gpu.log" 2>&1
tests_rc=$?
stamp "tests (ARSERVE_TEST_DEVICE=$TEST_DEVICE) rc=$tests_rc: $(tail -n 1 "$OUT/test-gpu.log")"

# 4. the benchmark
timeout "$BENCH_TIMEOUT" $PY -m arserve.cli bench --suite gpu $BENCH_ARGS --out "$OUT/gpu.json" \
  >"$OUT/bench-gpu.log" 2>&1
bench_rc=$?
stamp "bench rc=$bench_rc: $(tail -n 1 "$OUT/bench-gpu.log")"
stamp "done in $(( $(date +%s) - start ))s"
exit $(( tests_rc || bench_rc ))
