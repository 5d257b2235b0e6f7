#!/usr/bin/env bash
# Scenario: the cost of history. The same 3 Fanout nodes + one Redis, the
# same clients and messages, with history off (FANOUT_HISTORY_SIZE=0: plain
# PUBLISH) and at the default size. Reports publish throughput, deliveries/s,
# Redis CPU per publish, and Redis memory per topic once each topic's
# history is full (every topic gets more messages than the history keeps).
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
# Env: TOPICS (10), MESSAGES (30000), CLIENTS (300); SIZE scales the
# defaults (see lib.sh).
TOPICS=${TOPICS:-$(size 10)}
MESSAGES=${MESSAGES:-$(size 30000)}
CLIENTS=${CLIENTS:-$(size 300)}
ARGS=(--clients "$CLIENTS" --topics "$TOPICS" --messages "$MESSAGES" --publishers 6 --payload-bytes 64)

run_history() { # run_history LABEL HISTORY_SIZE
  local label=$1 size=$2 rport nodes=() pids=()
  rport=$(free_port)
  start_redis "$rport"
  for _ in 1 2 3; do
    local p; p=$(free_port)
    start_fanout "$p" FANOUT_REDIS_URL="redis://127.0.0.1:$rport" FANOUT_HISTORY_SIZE="$size"
    nodes+=("127.0.0.1:$p")
    pids+=("$LAST_PID")
  done
  local before after used
  before=$(redis_cpu "$rport")
  run_bench --label "$label" --scenario history \
    --nodes "$(IFS=,; echo "${nodes[*]}")" --pids "$(IFS=,; echo "${pids[*]}")" "${ARGS[@]}"
  after=$(redis_cpu "$rport")
  used=0
  for key in $(redis-cli -p "$rport" --scan --pattern 'fanout:[hm]:*'); do
    used=$((used + $(redis-cli -p "$rport" memory usage "$key" samples 0)))
  done
  python3 - "$RESULTS" "$before" "$after" "$used" "$TOPICS" <<'PY'
import json, sys
path, before, after, used, topics = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lines = open(path).read().splitlines()
r = json.loads(lines[-1])
r["redis"] = {
    "cpu_secs": round(after - before, 3),
    "cpu_us_per_publish": round((after - before) / r["messages"] * 1e6, 2),
    "publishes_per_sec": round(r["messages"] / r["publish_secs"], 1),
    "history_bytes_per_topic": used // topics,
}
lines[-1] = json.dumps(r)
open(path, "w").write("\n".join(lines) + "\n")
PY
  stop_all
}

log "history off (plain PUBLISH)"
run_history "history-off" 0
log "history at the default size"
run_history "history-1000" 1000

[ "${KEEP_RESULTS:-}" ] || python3 - "$RESULTS" <<'PY'
import json, sys
print(f"{'run':14} {'publishes/s':>12} {'deliveries/s':>13} {'redis cpu us/publish':>21} {'history bytes/topic':>20} {'missing':>8}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("scenario") != "history":
        continue
    x = r["redis"]
    print(f"{r['label']:14} {x['publishes_per_sec']:>12,.0f} {r['deliveries_per_sec']:>13,.0f} {x['cpu_us_per_publish']:>21} {x['history_bytes_per_topic']:>20,} {r['missing']:>8}")
PY
