#!/usr/bin/env bash
# The largest scale this machine holds: 3 Fanout nodes + Redis (core 0) and
# about 50,000 SSE connections, all on one topic, then broadcasts.
#
# Each process may hold 20,000 open files here, so the connections come
# from several fanout-bench processes (core 1): LISTENERS processes of
# PER_LISTENER clients that only receive, and one that also publishes.
# Every process checks its own deliveries (order per publisher, none
# missing or twice); this script adds them up.
#
#   bench/scenarios/large-scale.sh
# Env: LISTENERS (3), PER_LISTENER (16000), PUBLISHER_CLIENTS (2000),
#      MESSAGES (40), PUBLISHERS (2), RATE (0 = as fast as accepted);
#      SIZE scales the client and message defaults (see lib.sh).
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
LISTENERS=${LISTENERS:-3}
PER_LISTENER=${PER_LISTENER:-$(size 16000)}
PUBLISHER_CLIENTS=${PUBLISHER_CLIENTS:-$(size 2000)}
MESSAGES=${MESSAGES:-$(size 40)}
PUBLISHERS=${PUBLISHERS:-2}
RATE=${RATE:-0}
LABEL=${LABEL:-large}

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

rport=$(free_port)
start_redis "$rport"
redis_pid=$LAST_PID
nodes=() node_pids=()
for _ in 1 2 3; do
  p=$(free_port)
  start_fanout "$p" FANOUT_REDIS_URL="redis://127.0.0.1:$rport"
  nodes+=("127.0.0.1:$p"); node_pids+=("$LAST_PID")
done
csv_nodes=$(IFS=,; echo "${nodes[*]}")
baseline=(); for pid in "${node_pids[@]}"; do baseline+=("$(rss "$pid")"); done
COMMON=(--nodes "$csv_nodes" --topics 1 --messages "$MESSAGES" --publishers "$PUBLISHERS"
        --rate "$RATE" --scenario "$LABEL" --quiet --json-out "$RESULTS" --settle 20s)
ulimit -n "$(ulimit -Hn)"

log "$LABEL: $LISTENERS listening processes x $PER_LISTENER clients"
connect_start=$(date +%s.%N)
listeners=()
for i in $(seq 1 "$LISTENERS"); do
  rm -f "$WORK/ready-$i"
  "${ON_BENCH_CPU[@]}" "$BENCH" run "${COMMON[@]}" --clients "$PER_LISTENER" --listen-only \
    --ready-file "$WORK/ready-$i" --label "$LABEL-listener-$i" >/dev/null 2>>"$WORK/large.log" &
  listeners+=("$!")
done
for i in $(seq 1 "$LISTENERS"); do
  until [ -e "$WORK/ready-$i" ]; do
    kill -0 "${listeners[$((i - 1))]}" 2>/dev/null || { echo "listener $i exited early" >&2; exit 1; }
    sleep 0.2
  done
done
connect_end=$(date +%s.%N)
connected_rss=(); for pid in "${node_pids[@]}"; do connected_rss+=("$(rss "$pid")"); done

log "$LABEL: the publishing process ($PUBLISHER_CLIENTS clients) broadcasts $MESSAGES messages"
"${ON_BENCH_CPU[@]}" "$BENCH" run "${COMMON[@]}" --clients "$PUBLISHER_CLIENTS" \
  --label "$LABEL-publisher" --pids "$(IFS=,; echo "${node_pids[*]},$redis_pid")" >/dev/null 2>>"$WORK/large.log"
for pid in "${listeners[@]}"; do wait "$pid"; done
stop_all

python3 - "$RESULTS" "$LABEL" "$connect_start" "$connect_end" \
  "${baseline[*]}" "${connected_rss[*]}" "$PER_LISTENER" "$LISTENERS" <<'PY'
import json, sys
path, label, t0, t1, base, conn, per, listeners = sys.argv[1:]
runs = [json.loads(l) for l in open(path) if l.strip()]
runs = [r for r in runs if r["scenario"] == label]
pub = next(r for r in runs if r["label"].endswith("-publisher"))
clients = sum(r["connected"] for r in runs)
received = sum(r["received"] for r in runs)
expected = sum(r["expected"] for r in runs)
last = max(r["last_delivery_unix_us"] for r in runs)
secs = (last - pub["publish_start_unix_us"]) / 1e6
base, conn = [int(x) for x in base.split()], [int(x) for x in conn.split()]
listening = int(per) * int(listeners)
summary = {
    "scenario": label, "nodes": 3, "connections": clients,
    "listener_connect_per_sec": round(listening / (float(t1) - float(t0))),
    "node_kib": [{"baseline": b, "connected": c} for b, c in zip(base, conn)],
    "bytes_per_connection_per_node": [round((c - b) * 1024 / (listening / 3)) for b, c in zip(base, conn)],
    "expected": expected, "received": received,
    "missing": sum(r["missing"] for r in runs), "duplicated": sum(r["duplicated"] for r in runs),
    "out_of_order": sum(r["out_of_order"] for r in runs),
    "deliveries_per_sec": round(received / secs) if secs > 0 else 0,
    "latency_ms_p50_max_over_processes": max(r["latency_ms"]["p50"] for r in runs),
    "latency_ms_p99_max_over_processes": max(r["latency_ms"]["p99"] for r in runs),
    "server_cpu_secs": pub["cpu_secs"]["server"],
}
print(json.dumps(summary))
with open(path.replace(".jsonl", "-large.jsonl"), "a") as f:
    f.write(json.dumps(summary) + "\n")
PY
