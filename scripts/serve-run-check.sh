#!/usr/bin/env bash
# The shipped config through Ray's own CLI, as a user runs it: Redis on :6379,
# a local Ray head with 2 CPUs (its GCS on a free port: 6379, Ray's default,
# is Redis's), `serve run deploy/serve_config.yaml` on that head, then the CLI
# against it: images plain and CSpD, and a text generation. Needs ports 6379,
# 8000 and 9000 free; exits non-zero at the first step that fails, and leaves
# nothing of its own running (other Rays untouched). Run from the repository root.
set -u
work=$(mktemp -d /tmp/arserve-serve-run.XXXXXX)
fail() { echo "serve-run-check: $*; logs in $work" >&2; exit 1; }
gcs_port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
serve=""
# Only this check's processes: `ray stop` would stop every Ray on the machine, other users' too, and Ray's
# agents rename themselves (ray::DashboardAgent), so no command line names this head. Every process started
# here, and every one Ray starts from them, inherits ARSERVE_CHECK. TERM, not INT: a script's background job
# starts with SIGINT ignored.
export ARSERVE_CHECK="$work"
export RAY_AUTH_MODE=token  # `ray start` turns token auth on; `serve run` must send the token it wrote
# The raylet starts its agents (ray::DashboardAgent, ray::RuntimeEnvAgent) with an environment of their own:
# they are found by the raylet's pid, and outlived it when only the others were stopped.
mine() {
  local pids p
  pids=$(grep -lsz "^ARSERVE_CHECK=$work\$" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$")
  for p in $pids; do echo "$p"; grep -lsz "^RAY_RAYLET_PID=$p\$" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3; done
}
cleanup() {
  [ -n "$serve" ] && kill -TERM "$serve" 2>/dev/null && sleep 5
  local pids
  pids=$(mine)
  kill -TERM $pids 2>/dev/null; sleep 3; kill -KILL $pids $(mine) 2>/dev/null
  [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null
  return 0
}
trap cleanup EXIT
redis-server --port 6379 --save "" --appendonly no --daemonize yes --dir "$work" --pidfile "$work/redis.pid" \
  > "$work/redis.log" 2>&1 || fail "redis-server did not start on :6379"
.venv/bin/ray start --head --port "$gcs_port" --temp-dir "$work/ray" --num-cpus 2 --include-dashboard false \
  --disable-usage-stats > "$work/ray-start.log" 2>&1 || fail "ray start failed (see ray-start.log)"
.venv/bin/serve run --address "127.0.0.1:$gcs_port" deploy/serve_config.yaml \
  > "$work/serve.log" 2>&1 &
serve=$!
started=$SECONDS
until .venv/bin/arserve generate --target 127.0.0.1:9000 --prompt "Hi" --max-tokens 2 > /dev/null 2>&1; do
  kill -0 "$serve" 2>/dev/null || fail "serve run exited (see serve.log)"
  [ $((SECONDS - started)) -lt 600 ] || fail "not serving after 600 s"
  sleep 2
done
echo "serving after $((SECONDS - started)) s (logs in $work)"
.venv/bin/arserve image --target 127.0.0.1:9000 --label 3,7 -n 2 --seed 1 -o "$work/plain.png" --speculative none \
  || fail "plain image"
.venv/bin/arserve image --target 127.0.0.1:9000 --label 3,7 -n 2 --seed 1 -o "$work/cspd.png" \
  --speculative draft_model --no-adaptive || fail "CSpD image"
.venv/bin/arserve generate --target 127.0.0.1:9000 --prompt "The capital of France is" --max-tokens 12 \
  || fail "text generation"
echo "serve-run-check: ok"
