#!/usr/bin/env bash
# Scenario: the relay on one Redis against a Redis Cluster of 3 primaries
# (+3 replicas), with the same 3 Fanout nodes, clients and messages.
# Every topic has subscribers on every node, so each publish is relayed to 3
# nodes. Reports, per topology: deliveries/s, relayed messages/s, and Redis
# CPU per relayed message (user+sys CPU of every Redis primary, from INFO,
# over the run). Fanout and Redis share core 0; the generator has core 1.
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
# Env: CLIENTS (3000), TOPICS (300), MESSAGES (60000); SIZE scales the
# defaults (see lib.sh).
CLIENTS=${CLIENTS:-$(size 3000)}
TOPICS=${TOPICS:-$(size 300)}
MESSAGES=${MESSAGES:-$(size 60000)}
ARGS=(--clients "$CLIENTS" --topics "$TOPICS" --messages "$MESSAGES" --publishers 6 --payload-bytes 64)

start_cluster() { # sets PRIMARY_PORTS and CLUSTER_URL
  local ports=()
  for _ in 1 2 3 4 5 6; do
    local p
    while :; do p=$(free_port); [ "$p" -lt 55000 ] && break; done
    mkdir -p "$WORK/cluster-$p"
    "${ON_SERVER_CPU[@]}" redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-node-timeout 1000 --save '' --appendonly no \
      --dir "$WORK/cluster-$p" >>"$WORK/redis.log" 2>&1 &
    PIDS+=("$!")
    ports+=("$p")
  done
  for p in "${ports[@]}"; do
    for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.05; done
  done
  redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 \
    --cluster-yes >/dev/null
  for p in "${ports[@]}"; do
    until redis-cli -p "$p" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
  done
  PRIMARY_PORTS=($(redis-cli -p "${ports[0]}" cluster nodes | awk '/master/ {split($2, a, "[:@]"); print a[2]}'))
  CLUSTER_URL="redis+cluster://$(printf '127.0.0.1:%s,' "${ports[@]}" | sed 's/,$//')"
}

run_topology() { # run_topology LABEL URL PRIMARY_PORTS...
  local label=$1 url=$2; shift 2
  local nodes=() pids=()
  for _ in 1 2 3; do
    local p; p=$(free_port)
    start_fanout "$p" FANOUT_REDIS_URL="$url"
    nodes+=("127.0.0.1:$p")
    pids+=("$LAST_PID")
  done
  local before after
  before=$(redis_cpu "$@")
  run_bench --label "$label" --scenario relay \
    --nodes "$(IFS=,; echo "${nodes[*]}")" --pids "$(IFS=,; echo "${pids[*]}")" "${ARGS[@]}"
  after=$(redis_cpu "$@")
  # The run's line, with Redis CPU added.
  python3 - "$RESULTS" "$before" "$after" "$#" <<'PY'
import json, sys
path, before, after, primaries = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
lines = open(path).read().splitlines()
r = json.loads(lines[-1])
relayed = r["messages"] * r["nodes"]
secs = r["publish_secs"] + r["deliver_secs"]
r["redis"] = {
    "primaries": primaries,
    "cpu_secs": round(after - before, 3),
    "relayed_messages": relayed,
    "relayed_per_sec": round(relayed / r["deliver_secs"], 1) if r["deliver_secs"] else None,
    "cpu_us_per_relayed_message": round((after - before) / relayed * 1e6, 2),
}
lines[-1] = json.dumps(r)
open(path, "w").write("\n".join(lines) + "\n")
PY
  stop_all
}

rport=$(free_port)
log "relay over one Redis"
start_redis "$rport"
run_topology "fanout-3-nodes+redis" "redis://127.0.0.1:$rport" "$rport"

log "relay over a Redis Cluster (3 primaries + 3 replicas)"
start_cluster
run_topology "fanout-3-nodes+redis-cluster" "$CLUSTER_URL" "${PRIMARY_PORTS[@]}"

[ "${KEEP_RESULTS:-}" ] || python3 - "$RESULTS" <<'PY'
import json, sys
print(f"{'topology':34} {'deliveries/s':>13} {'relayed/s':>10} {'redis cpu us/relayed':>21} {'missing':>8} {'p99 ms':>7}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("scenario") != "relay":
        continue
    x = r["redis"]
    print(f"{r['label']:34} {r['deliveries_per_sec']:>13,.0f} {x['relayed_per_sec']:>10,.0f} {x['cpu_us_per_relayed_message']:>21} {r['missing']:>8} {r['latency_ms'].get('p99', 0):>7}")
PY
