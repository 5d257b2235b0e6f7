#!/usr/bin/env bash
# Scenario 5, slow consumers: 200 clients get 200 messages of 64 KiB at
# 10/s (12.5 MiB each: more than the kernel's 4 MiB send-buffer ceiling, so
# a stalled reader really stalls the server's writes); in the second run 1%
# of them stop reading after PB_CONNECT (with a 4 KiB receive buffer). The others must see every message, in order, with
# latency like the first run; the stalled ones are dropped by the server
# (queue full or write timeout), counted in its metrics.
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
# SIZE=10 for a smoke test in seconds (see lib.sh; 1% of too few clients
# is no slow client at all).
ARGS=(--clients "$(size 200)" --topics 1 --messages "$(size 200)" --publishers 1 --rate 10 --payload-bytes 65536)
for slow in 0 1; do
  port=$(free_port)
  log "slow-consumers ($slow%) on fanout"
  start_fanout "$port" FANOUT_CLIENT_QUEUE=64 FANOUT_WRITE_TIMEOUT=5s
  run_bench --label fanout --scenario "slow-consumers-${slow}pct" --nodes "127.0.0.1:$port" \
    --pids "$LAST_PID" --slow-percent "$slow" "${ARGS[@]}"
  stop_all
done
[ "${KEEP_RESULTS:-}" ] || cat "$RESULTS"
