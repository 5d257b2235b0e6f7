#!/usr/bin/env bash
# Companion mode (docs/pocketbase.md) against PocketBase alone, in one run
# (issue 20): the same PocketBase, the same records created through its REST
# API, SSE clients connected either to PocketBase itself or to Fanout nodes
# in companion mode (+ Redis) bridging them onto PocketBase.
#
#   bench/compare-companion.sh                       # full size, ~10 minutes
#   CLIENTS=200 USERS=50 MESSAGES=50 USER_MESSAGES=20 bench/compare-companion.sh   # smoke test, seconds
#   UPDATE_DOCS=1 bench/compare-companion.sh         # also rewrite the tables in docs/
#
# Scenarios, each on a fresh PocketBase (and fresh Fanout + Redis):
#   public-max     CLIENTS guests on posts/*, MESSAGES records as fast as PocketBase accepts
#   public-paced   the same, RATE records/s (PACED_MESSAGES records)
#   per-user-max   USERS users, one client each with its own token on notes/*
#                  (list rule owner = @request.auth.id), USER_MESSAGES records,
#                  record j owned by user j % USERS
#   per-user-paced the same at USER_RATE records/s
# Settings (env): CLIENTS=10000 MESSAGES=100 RATE=1 PACED_MESSAGES=20
#   USERS=1000 USER_MESSAGES=100 USER_RATE=5 PUBLISHERS=4 NODES=1
#   SCENARIOS="public-max public-paced per-user-max per-user-paced"
#   OUT=<file for the raw JSON result lines> (default: in the work directory)
#
# PocketBase, Redis and the Fanout nodes are pinned to core 0 (taskset), the
# load generator to core 1, in both runs. docs/ is left alone unless
# UPDATE_DOCS=1 (or --update-docs) is given.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = --update-docs ] && UPDATE_DOCS=1
export BENCH_WORK="${BENCH_WORK:-$(mktemp -d /tmp/fanout-companion.XXXXXX)}"
export RESULTS="${OUT:-$BENCH_WORK/companion.jsonl}"
source bench/scenarios/lib.sh
[ "${SKIP_BUILD:-}" ] || build
PB=$(pocketbase_bin)

CLIENTS=${CLIENTS:-10000} MESSAGES=${MESSAGES:-100} RATE=${RATE:-1}
PACED_MESSAGES=${PACED_MESSAGES:-20}
USERS=${USERS:-1000} USER_MESSAGES=${USER_MESSAGES:-100} USER_RATE=${USER_RATE:-5}
PUBLISHERS=${PUBLISHERS:-4} NODES=${NODES:-1}
SCENARIOS=${SCENARIOS:-public-max public-paced per-user-max per-user-paced}
SECRET="bench-secret-$$-$RANDOM"
SU_EMAIL=root@fanout.test SU_PASS=correct-horse-battery

# start_pb: a fresh PocketBase with the companion hooks and the bench's
# collections and users; sets PB_PORT, PB_PID, TOKENS.
start_pb() {
  local dir; dir=$(mktemp -d "$WORK/pb.XXXXXX")
  mkdir -p "$dir/pb_hooks"
  cp deploy/pocketbase/pb_hooks/fanout.pb.js bench/peers/bench-users.pb.js "$dir/pb_hooks/"
  "$PB" superuser upsert "$SU_EMAIL" "$SU_PASS" --dir "$dir/pb_data" >/dev/null
  PB_PORT=$(free_port)
  FANOUT_SECRET="$SECRET" bash -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null || true; exec "$@"' _ \
    "${ON_SERVER_CPU[@]}" "$PB" serve --http "127.0.0.1:$PB_PORT" \
    --dir "$dir/pb_data" --hooksDir "$dir/pb_hooks" >>"$dir/log" 2>&1 &
  PB_PID=$!
  PIDS+=("$PB_PID")
  wait_http "http://127.0.0.1:$PB_PORT/api/health"
  TOKENS="$dir/tokens"
  python3 bench/pocketbase_setup.py "http://127.0.0.1:$PB_PORT" "$SU_EMAIL" "$SU_PASS" "$USERS" "$TOKENS"
}

# one TARGET SCENARIO: fresh servers, one fanout-bench run, servers stopped.
one() {
  local target=$1 scenario=$2 args=()
  log "$scenario on $target (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  start_pb
  case $scenario in
    public-max) args=(--pocketbase-collection posts --clients "$CLIENTS" --messages "$MESSAGES") ;;
    public-paced) args=(--pocketbase-collection posts --clients "$CLIENTS" --messages "$PACED_MESSAGES" --rate "$RATE") ;;
    per-user-max) args=(--pocketbase-collection notes --clients "$USERS" --messages "$USER_MESSAGES") ;;
    per-user-paced) args=(--pocketbase-collection notes --clients "$USERS" --messages "$USER_MESSAGES" --rate "$USER_RATE") ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
  [[ $scenario == per-user-* ]] && args+=(--pocketbase-tokens "$TOKENS")
  local nodes=() pids=()
  if [ "$target" = companion ]; then
    local rport; rport=$(free_port)
    start_redis "$rport"
    pids+=("$LAST_PID")
    for _ in $(seq 1 "$NODES"); do
      local p; p=$(free_port)
      start_fanout "$p" FANOUT_REDIS_URL="redis://127.0.0.1:$rport" \
        FANOUT_POCKETBASE_URL="http://127.0.0.1:$PB_PORT" FANOUT_POCKETBASE_SECRET="$SECRET"
      pids+=("$LAST_PID")
      nodes+=("127.0.0.1:$p")
    done
  else
    nodes=("127.0.0.1:$PB_PORT")
  fi
  run_bench --label "$target" --scenario "$scenario" --publishers "$PUBLISHERS" \
    --nodes "$(IFS=,; echo "${nodes[*]}")" --pocketbase-url "127.0.0.1:$PB_PORT" \
    --pocketbase-pid "$PB_PID" ${pids[@]:+--pids "$(IFS=,; echo "${pids[*]}")"} "${args[@]}"
  stop_all
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for scenario in $SCENARIOS; do
  for target in pocketbase companion; do
    one "$target" "$scenario"
  done
done

COMMAND="bench/compare-companion.sh"
for v in CLIENTS MESSAGES RATE PACED_MESSAGES USERS USER_MESSAGES USER_RATE PUBLISHERS NODES; do
  COMMAND="$v=${!v} $COMMAND"
done
HEADER="\`$COMMAND\`: PocketBase $("$PB" --version | awk '{print $NF}'), Fanout $(git rev-parse --short HEAD), $(nproc) cores, load average $LOAD_BEFORE before the run and $(cut -d' ' -f1-3 /proc/loadavg) after (other work shared the machine)"
python3 bench/companion_report.py "$RESULTS" "$HEADER" > "$BENCH_WORK/companion.md"
cat "$BENCH_WORK/companion.md"
log "raw results: $RESULTS; table: $BENCH_WORK/companion.md"
if [ "${UPDATE_DOCS:-}" = 1 ]; then
  python3 bench/companion_report.py --update-docs "$BENCH_WORK/companion.md" docs/pocketbase.md docs/benchmarks.md
  cp "$RESULTS" docs/companion-benchmark.jsonl
  log "updated the companion tables in docs/pocketbase.md and docs/benchmarks.md, and docs/companion-benchmark.jsonl"
else
  log "docs/ not changed (UPDATE_DOCS=1 or --update-docs writes the table there)"
fi
