#!/usr/bin/env bash
# Scenario 5, slow consumers: 5,000 clients, 1% of them stop reading after
# PB_CONNECT; the others must see every message, in order, with latency like
# the same run without slow clients (broadcast-5k-paced).
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
port=$(free_port)
log "slow-consumers on fanout"
start_fanout "$port" FANOUT_CLIENT_QUEUE=64 FANOUT_WRITE_TIMEOUT=5s
run_bench --label fanout --scenario slow-consumers-1pct --nodes "127.0.0.1:$port" --pids "$LAST_PID" \
  --clients 5000 --topics 1 --messages 100 --publishers 1 --rate 5 --payload-bytes 2048 --slow-percent 1
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^fanout_slow_client_disconnects_total|^fanout_connections_closed_total' \
  > "$WORK/slow-metrics.txt" || true
cat "$WORK/slow-metrics.txt" >&2
stop_all
[ "${KEEP_RESULTS:-}" ] || cat "$RESULTS"
