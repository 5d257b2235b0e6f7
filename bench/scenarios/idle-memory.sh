#!/usr/bin/env bash
# Scenario 3, idle memory: 15,000 idle connections; resident memory per
# connection = (connected - empty process) / connections.
#   TARGET=fanout|pocketbase bench/scenarios/idle-memory.sh
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
# SIZE=2 for a smoke test in seconds (see lib.sh).
scenario "${TARGET:-fanout}" idle-15k --clients "$(size 15000)" --idle --hold 5s
[ "${KEEP_RESULTS:-}" ] || cat "$RESULTS"
