#!/usr/bin/env bash
# Fanout's cluster against the cluster a team would pick instead (socket.io 4
# with @socket.io/redis-adapter), against the kernel's floor, and at low load
# through the relay, all in one run on this machine. Writes
# benchmarks-cluster.md and the raw lines (benchmarks-cluster.jsonl,
# benchmarks-large.jsonl, benchmarks-floor.jsonl) into a fresh
# /tmp/fanout-compare-sio.* directory, printed at the end; with
# --update-docs, over the published ones in docs/.
#
#   bench/compare-socketio.sh [--update-docs]
#   SIZE=2 bench/compare-socketio.sh     # a smoke test (bench/scenarios/lib.sh)
#
# Installs: socket.io and its Redis adapter with `npm ci` in
# bench/peers/socketio (its own node_modules, nothing global). Builds the
# release binaries of fanout and fanout-bench.
#
# Both clusters: 3 servers + 1 Redis pinned to core 0, the load generator on
# core 1. The largest-scale runs (bench/scenarios/large-scale.sh) spread about
# 50,000 connections over 4 generator processes. Fanout's generator is fanout-bench (SSE); socket.io's is the
# official socket.io-client on WebSocket (bench/peers/socketio/loadgen.mjs).
# The no-op row runs socket.io's generator against a server that does no
# socket.io work (pre-encoded frames), to show the generator's own ceiling.
# Needs: cargo, node + npm, redis-server, taskset. About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATE_DOCS=
case "${1:-}" in
  "") ;;
  --update-docs) UPDATE_DOCS=1 ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--update-docs]" >&2; exit 2 ;;
esac
if [ "$UPDATE_DOCS" ] && [ "${SIZE:-100}" != 100 ]; then
  echo "--update-docs writes the published figures: run it at SIZE=100" >&2
  exit 2
fi
export BENCH_WORK="$(mktemp -d /tmp/fanout-compare-sio.XXXXXX)"
export RESULTS="$BENCH_WORK/results.jsonl"
source bench/scenarios/lib.sh
build
PEER="$ROOT/bench/peers/socketio"
(cd "$PEER" && npm ci --no-audit --no-fund --loglevel=error)

start_socketio() { # start_socketio PORT [env...]; sets LAST_PID
  local port=$1; shift
  env "$@" PORT="$port" "${ON_SERVER_CPU[@]}" node "$PEER/server.mjs" >>"$WORK/socketio-$port.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  wait_http "http://127.0.0.1:$port/api/health"
}

loadgen() { # loadgen ARGS...: socket.io's generator on the bench core
  "${ON_BENCH_CPU[@]}" node "$PEER/loadgen.mjs" --json-out "$RESULTS" "$@" >/dev/null
}

# cluster SYSTEM SCENARIO NODES ARGS...: a fresh cluster of NODES servers
# (+ Redis when NODES > 1), one run, everything stopped.
cluster() {
  local system=$1 scenario=$2 n=$3; shift 3
  local label="$system-$n-node"; [ "$n" -gt 1 ] && label="$system-$n-nodes+redis"
  log "$scenario: $label"
  local env=() pids=() nodes=()
  if [ "$n" -gt 1 ]; then
    local rport; rport=$(free_port)
    start_redis "$rport"; pids+=("$LAST_PID")
    if [ "$system" = fanout ]; then env=(FANOUT_REDIS_URL="redis://127.0.0.1:$rport"); else env=(REDIS_URL="redis://127.0.0.1:$rport"); fi
  fi
  for _ in $(seq 1 "$n"); do
    local p; p=$(free_port)
    if [ "$system" = fanout ]; then start_fanout "$p" "${env[@]}"; else start_socketio "$p" "${env[@]}"; fi
    pids+=("$LAST_PID"); nodes+=("127.0.0.1:$p")
  done
  local csv_nodes csv_pids
  csv_nodes=$(IFS=,; echo "${nodes[*]}"); csv_pids=$(IFS=,; echo "${pids[*]}")
  if [ "$system" = fanout ]; then
    run_bench --label "$label" --scenario "$scenario" --nodes "$csv_nodes" --pids "$csv_pids" "$@"
  else
    loadgen --label "$label" --scenario "$scenario" --servers "$csv_nodes" --pids "$csv_pids" "$@"
  fi
  stop_all
}

ONE_ROOM=(--clients "$(size 6000)" --topics 1 --messages "$(size 200)" --publishers 4)
MANY_ROOMS=(--clients "$(size 6000)" --topics "$(size 1000)" --messages "$(size 20000)" --publishers 6)
LOW_LOAD=(--clients "$(size 300)" --topics 1 --messages "$(size 200)" --publishers 1 --rate 20)
for system in fanout socketio; do
  cluster "$system" one-room 3 "${ONE_ROOM[@]}"
  cluster "$system" many-rooms 3 "${MANY_ROOMS[@]}"
  cluster "$system" low-load 3 "${LOW_LOAD[@]}"
  cluster "$system" low-load 1 "${LOW_LOAD[@]}"
done

log "one-room: socket.io's generator against the no-op server (its ceiling)"
port=$(free_port)
start_socketio "$port" NOOP=1
loadgen --label socketio-generator-vs-noop --scenario one-room --servers "127.0.0.1:$port" --pids "$LAST_PID" "${ONE_ROOM[@]}"
stop_all

log "the kernel's floor at 5,000 sockets, then Fanout paced at 5,000 subscribers"
FLOOR="$BENCH_WORK/floor.jsonl"
"$BENCH" floor --connections "$(size 5000)" --bytes 150 --sweeps 20 \
  --writer-cpu "$SERVER_CPU" --reader-cpu "$BENCH_CPU" --json-out "$FLOOR" >/dev/null
scenario fanout broadcast-5k-paced --clients "$(size 5000)" --topics 1 --messages "$(size 100)" --publishers 1 --rate 5

log "the largest scale here: ~50,000 connections on 3 nodes + Redis, broadcast as fast as accepted, then paced"
LABEL=large bench/scenarios/large-scale.sh
LABEL=large-paced MESSAGES=20 PUBLISHERS=1 RATE=2 bench/scenarios/large-scale.sh
LARGE="${RESULTS%.jsonl}-large.jsonl"

OUT="$BENCH_WORK"
[ -z "$UPDATE_DOCS" ] || OUT=docs
cp "$RESULTS" "$OUT/benchmarks-cluster.jsonl"
cp "$LARGE" "$OUT/benchmarks-large.jsonl"
cp "$FLOOR" "$OUT/benchmarks-floor.jsonl"
python3 bench/cluster_report.py --results "$RESULTS" --floor "$FLOOR" --large "$LARGE" --out "$OUT/benchmarks-cluster.md" \
  --command "bench/compare-socketio.sh   # socket.io $(cd "$PEER" && node -p 'require("socket.io/package.json").version'), @socket.io/redis-adapter $(cd "$PEER" && node -p 'require("@socket.io/redis-adapter/package.json").version'), Fanout $(git rev-parse --short HEAD)"
log "wrote $OUT/benchmarks-cluster.md (work files in $BENCH_WORK)"
