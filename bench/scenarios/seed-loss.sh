#!/usr/bin/env bash
# Scenario: a node given one Redis Cluster seed loses that seed. A 3-primary
# + 3-replica cluster; one Fanout node given a plain `redis://` URL of one
# primary (the auto-detected form); a publish every EVERY s (0.05), to 32
# topics in turn (so every primary gets some); the seed is
# killed (its replica takes over). Over WINDOW seconds after the kill it
# samples the node's CPU (utime + stime from /proc/<pid>/stat) and counts
# the publish answers. Prints one JSON line: cpu_pct (of one core, over the
# window), ok, refused, and first_ok_after_kill_secs.
#   SKIP_BUILD=1 FANOUT_BIN=target/debug/fanout bench/scenarios/seed-loss.sh
# runs it on any binary (a debug build costs more CPU than a release one).
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
FANOUT=${FANOUT_BIN:-$FANOUT}
WINDOW=${WINDOW:-10}
declare -A REDIS_PID
ports=()
for _ in 1 2 3 4 5 6; do
  while :; do p=$(free_port); [ "$p" -lt 55000 ] && break; done
  mkdir -p "$WORK/cluster-$p"
  redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file nodes.conf --cluster-node-timeout 1000 --save '' --appendonly no \
    --cluster-replica-validity-factor 0 --dir "$WORK/cluster-$p" >>"$WORK/redis.log" 2>&1 &
  PIDS+=("$!")
  REDIS_PID[$p]=$!
  ports+=("$p")
done
for p in "${ports[@]}"; do
  for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.05; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 \
  --cluster-yes >/dev/null
for p in "${ports[@]}"; do
  until redis-cli -p "$p" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
  until redis-cli -p "$p" info replication | grep -qE 'role:master|master_link_status:up'; do sleep 0.1; done
done
seed=$(redis-cli -p "${ports[0]}" cluster nodes | awk '/master/ {split($2, a, "[:@]"); print a[2]; exit}')
port=$(free_port)
log "one node seeded with 127.0.0.1:$seed"
start_fanout "$port" FANOUT_REDIS_URL="redis://127.0.0.1:$seed" FANOUT_HEARTBEAT_INTERVAL="${HEARTBEAT:-2s}"
pid=$LAST_PID
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/api/health")" = 200 ]; do sleep 0.1; done
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
log "killing the seed; sampling for ${WINDOW}s"
kill -9 "${REDIS_PID[$seed]}"
start=$(date +%s.%N)
c0=$(ticks)
ok=0 refused=0 first=""
n=0
while :; do
  now=$(date +%s.%N)
  elapsed=$(echo "$now - $start" | bc)
  [ "$(echo "$elapsed >= $WINDOW" | bc)" = 1 ] && break
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
    -d "{\"topic\":\"t$((n % 32))\",\"data\":$n}" "http://127.0.0.1:$port/api/publish")
  n=$((n + 1))
  if [ "$code" = 200 ]; then
    ok=$((ok + 1))
    [ -n "$first" ] || first=$elapsed
  else
    refused=$((refused + 1))
  fi
  sleep "${EVERY:-0.05}"
done
c1=$(ticks)
python3 - "$c0" "$c1" "$WINDOW" "$ok" "$refused" "${first:-null}" <<'PY'
import json, sys
c0, c1, window = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
first = None if sys.argv[6] == "null" else round(float(sys.argv[6]), 2)
print(json.dumps({"scenario": "seed-loss", "window_secs": window,
                  "cpu_pct": round((c1 - c0) / 100 / window * 100, 1),
                  "ok": int(sys.argv[4]), "refused": int(sys.argv[5]),
                  "first_ok_after_kill_secs": first}))
PY
