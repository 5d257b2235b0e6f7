#!/usr/bin/env bash
# Scenario 4, cluster: the same clients and messages against 1 node, then
# against 3 nodes + Redis (clients spread over the nodes, each subscribing
# through another node, publishers spread too). All servers share core 0.
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
# SIZE=2 for a smoke test in seconds (see lib.sh).
ARGS=(--clients "$(size 6000)" --topics "$(size 10)" --messages "$(size 2000)" --publishers 6)

port=$(free_port)
log "cluster-1-node"
start_fanout "$port"
run_bench --label fanout-1-node --scenario cluster --nodes "127.0.0.1:$port" --pids "$LAST_PID" "${ARGS[@]}"
stop_all

rport=$(free_port)
log "cluster-3-nodes+redis"
start_redis "$rport"
pids=("$LAST_PID")
nodes=()
for _ in 1 2 3; do
  p=$(free_port)
  start_fanout "$p" FANOUT_REDIS_URL="redis://127.0.0.1:$rport"
  pids+=("$LAST_PID")
  nodes+=("127.0.0.1:$p")
done
run_bench --label fanout-3-nodes+redis --scenario cluster \
  --nodes "$(IFS=,; echo "${nodes[*]}")" --pids "$(IFS=,; echo "${pids[*]}")" "${ARGS[@]}"
stop_all
[ "${KEEP_RESULTS:-}" ] || cat "$RESULTS"
