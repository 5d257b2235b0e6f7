#!/usr/bin/env bash
# Scenario 2, many topics: 10,000 clients over 1,000 topics, 20,000 messages.
#   TARGET=fanout|pocketbase bench/scenarios/many-topics.sh
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
# SIZE=2 for a smoke test in seconds (see lib.sh).
scenario "${TARGET:-fanout}" many-topics --clients "$(size 10000)" --topics "$(size 1000)" \
  --messages "$(size 20000)" --publishers 8 --max-duration 240s
[ "${KEEP_RESULTS:-}" ] || cat "$RESULTS"
