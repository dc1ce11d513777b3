#!/usr/bin/env bash
# The shipped config through Ray's own CLI, as a user runs it: Redis on :6379,
# a local Ray head with 2 CPUs, `serve run deploy/serve_config.yaml`, then the
# CLI against it: images plain and CSpD, and a text generation. Needs ports
# 6379, 8000 and 9000 free; leaves nothing of its own running (other Rays untouched). Run from the repository root.
set -u
work=$(mktemp -d /tmp/arserve-serve-run.XXXXXX)
redis-server --port 6379 --save "" --appendonly no --daemonize yes --dir "$work" --pidfile "$work/redis.pid"
.venv/bin/ray start --head --temp-dir "$work/ray" --num-cpus 2 --include-dashboard false \
  --disable-usage-stats > "$work/ray-start.log" 2>&1
.venv/bin/serve run deploy/serve_config.yaml > "$work/serve.log" 2>&1 &
serve=$!
# Only this head's processes (each names its session under $work/ray): `ray stop` would stop every Ray
# on the machine, other users' too.
cleanup() {
  kill -INT $serve 2>/dev/null; sleep 5
  pkill -TERM -f -- "$work/ray" 2>/dev/null; sleep 3; pkill -KILL -f -- "$work/ray" 2>/dev/null
  kill "$(cat "$work/redis.pid")"
}
trap cleanup EXIT
for i in $(seq 300); do
  .venv/bin/arserve generate --target 127.0.0.1:9000 --prompt "Hi" --max-tokens 2 > /dev/null 2>&1 && break
  sleep 2
done
echo "serving after about $((i * 2)) s (logs in $work)"
.venv/bin/arserve image --target 127.0.0.1:9000 --label 3,7 -n 2 --seed 1 -o "$work/plain.png" --speculative none
.venv/bin/arserve image --target 127.0.0.1:9000 --label 3,7 -n 2 --seed 1 -o "$work/cspd.png" --speculative draft_model
.venv/bin/arserve generate --target 127.0.0.1:9000 --prompt "The capital of France is" --max-tokens 12
